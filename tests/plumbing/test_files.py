"""plumbing/files.py: atomic writes (whole files, the umask's mode) and the lock on --save."""
import os

import pytest
import torch

from conftest import SMALL, describe, error_line, file_mode, finish, read_until, start_training, temp_files, umask
from plumbing import checkpoint, files


@pytest.mark.parametrize('mask, mode', [(0o022, 0o644), (0o077, 0o600), (0o027, 0o640), (0o002, 0o664)])
def test_atomic_write_follows_the_umask(mask, mode, tmp_path):
    """0o666 & ~umask, as open() gives a new file (mkstemp would give 0600 whatever the umask)."""
    path = tmp_path / 'out.txt'
    with umask(mask):
        with files.atomic_write(str(path), 'w', encoding='utf-8') as f:
            f.write('héllo\n')
        assert file_mode(path) == mode
        checkpoint.save({'format': checkpoint.FORMAT, 'x': torch.arange(3)}, str(tmp_path / 'model.pt'))
        assert file_mode(tmp_path / 'model.pt') == mode
    assert path.read_text(encoding='utf-8') == 'héllo\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model.pt', 'out.txt']


def current_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def test_umask_helper_restores_the_umask():
    before = current_umask()
    with umask(0o077 if before != 0o077 else 0o027):
        assert current_umask() != before
    assert current_umask() == before
    with pytest.raises(RuntimeError):
        with umask(0o077):
            raise RuntimeError
    assert current_umask() == before


def test_atomic_write_replaces_the_file_only_when_the_block_ends(tmp_path):
    path = tmp_path / 'model.pt'
    path.write_bytes(b'old')
    with files.atomic_write(str(path)) as f:
        f.write(b'new contents')
        f.flush()
        assert path.read_bytes() == b'old'  # the new bytes go to a temporary file beside it
        assert len(temp_files(tmp_path)) == 1
    assert path.read_bytes() == b'new contents'
    assert not temp_files(tmp_path)


@pytest.mark.parametrize('error', [RuntimeError('disk full'), KeyboardInterrupt()])
def test_atomic_write_failure_keeps_the_old_file_and_leaves_no_temporary(error, tmp_path):
    path = tmp_path / 'generated.txt'
    path.write_text('earlier output\n')
    with pytest.raises(type(error)):
        with files.atomic_write(str(path), 'w') as f:
            f.write('half of the new ')
            raise error
    assert path.read_text() == 'earlier output\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['generated.txt']


def test_atomic_write_failure_without_an_old_file_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        with files.atomic_write(str(tmp_path / 'model.pt')):
            raise ValueError('pickling failed')
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with umask(0o022):
        with files.atomic_write('out.bin') as f:
            f.write(b'x')
    assert (tmp_path / 'out.bin').read_bytes() == b'x' and file_mode(tmp_path / 'out.bin') == 0o644
    assert not temp_files(tmp_path)


# ---------------------------------------------------------------- one run per --save

def test_one_run_per_save_and_a_killed_run_blocks_nothing(tmp_path, call_script, corpus_dir):
    """A second run on the same --save is refused, naming the first; once the first is killed (-9),
    the next run starts and removes the temporary files a killed run leaves, and only those."""
    first, watchdog = start_training(tmp_path, corpus_dir)
    seen = []
    try:
        assert read_until(first, '| epoch', seen), ''.join(seen)
        second = call_script('main.py', '--data', corpus_dir, *SMALL, '--epochs', 1, cwd=tmp_path)
        line = error_line(second, 'main.py', 2)
        assert line == (f'main.py: error: --save model.pt is in use by another run (process {first.pid}); '
                        f'wait for it to finish or give another --save.'), line
        assert '| epoch' not in second.stdout
    finally:
        first.kill()
        finish(first, watchdog, seen)
    stale = ['.model.pt.4321.0123abcd.tmp', '.model.pt.resume.77.deadbeef.tmp']
    others = ['.other.pt.4321.0123abcd.tmp', '.model.pt.notes.tmp', 'model.pt.4321.0123abcd.tmp']
    for name in stale + others:
        (tmp_path / name).write_bytes(b'a partial checkpoint')
    left = [n for n in temp_files(tmp_path) if n not in others]  # ours, and any the killed run was writing
    assert len(left) >= 2
    third = call_script('main.py', '--data', corpus_dir, *SMALL, '--epochs', 1, cwd=tmp_path)
    assert third.returncode == 0, describe(third)
    assert f'| removed {len(left)} temporary file(s) that a killed run left beside model.pt' in third.stdout
    assert sorted(temp_files(tmp_path)) == sorted(n for n in others if n.startswith('.'))
    assert (tmp_path / others[2]).exists()
    assert not (tmp_path / '.model.pt.lock').exists()  # removed when the run ends
    checkpoint.load(str(tmp_path / 'model.pt'))
