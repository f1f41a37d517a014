"""--dry-run: one batch of training and one of evaluation per epoch, with the usual output and files."""
import data
import training
from conftest import describe

ARGS = ['--emsize', 16, '--nhid', 16, '--batch_size', 8, '--bptt', 10, '--lr', 5, '--dropout', 0, '--save', 'model.pt']


def count_batches(monkeypatch):
    """The batches data.get_batch cuts, by the split they come from (recognised by their number of columns)."""
    counts = {'train': 0, 'evaluation': 0}
    original = data.get_batch

    def get_batch(source, i, bptt):
        counts['evaluation' if source.size(1) == training.EVAL_BATCH_SIZE else 'train'] += 1
        return original(source, i, bptt)
    monkeypatch.setattr(data, 'get_batch', get_batch)
    return counts


def test_dry_run_trains_and_evaluates_one_batch_per_epoch(tmp_path, call_script, corpus_dir, monkeypatch):
    counts = count_batches(monkeypatch)
    proc = call_script('main.py', '--data', corpus_dir, *ARGS, '--epochs', 2, '--dry-run', cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    # 2 epochs of one training batch; one valid batch per epoch and one test batch
    assert counts == {'train': 2, 'evaluation': 3}
    out = proc.stdout
    assert '| dry run: one batch of training and one batch of evaluation per epoch' in out
    progress = [line for line in out.splitlines() if line.startswith('| epoch ')]
    assert [line[:33] for line in progress] == [f'| epoch   {n} |     1/    1 batches' for n in (1, 2)]
    assert out.count('| end of epoch') == 2 and '| End of training | test loss' in out
    # nothing to resume: a dry run writes no SAVE.resume
    assert sorted(p.name for p in tmp_path.iterdir()) == ['model.pt', 'model.pt.metrics.jsonl']
