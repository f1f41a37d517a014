"""plumbing/cli.py: guarded_main's exit codes and error line; the training flags' checks."""
import sys

import pytest

from plumbing import cli, errors

ERRORS = [  # (exception, exit code)
    (errors.UsageError('--lr must be a positive number (got -1).'), 2),
    (errors.CannotResume('cannot resume from model.pt.resume: --nhid was 16, now 32.'), 2),
    (errors.DataError('data/train.txt has no tokens.'), 1),
    (errors.CheckpointError('model.pt is corrupt or not a PyTorch checkpoint.'), 1),
    (errors.TrainingDiverged('training diverged: the loss became inf in epoch 1 (try a smaller --lr).'), 1),
]


@pytest.fixture
def script_path(monkeypatch):
    """sys.argv[0] as `python /some/dir/train.py` sets it: errors name the script's basename."""
    monkeypatch.setattr(sys, 'argv', ['/some/dir/train.py', '--ignored'])


@pytest.mark.parametrize('error, code', ERRORS, ids=[type(e).__name__ for e, _ in ERRORS])
def test_error_kinds_map_to_exit_codes(error, code, script_path, capsys):
    def main(argv):
        print('working', flush=True)
        raise error

    assert cli.guarded_main(main, ['--x']) == code
    out, err = capsys.readouterr()
    assert out == 'working\n'  # what main printed before is kept, and the error goes to stderr only
    assert err == f'train.py: error: {error}\n'


def test_cannot_resume_is_a_usage_error_though_a_checkpoint_error(script_path, capsys):
    """CannotResume subclasses CheckpointError (exit 1) but is a command line that cannot work (exit 2)."""
    assert issubclass(errors.CannotResume, errors.CheckpointError)

    def main(argv):
        raise errors.CannotResume('x.resume is a best-model checkpoint.')

    assert cli.guarded_main(main) == 2
    assert capsys.readouterr().err == 'train.py: error: x.resume is a best-model checkpoint.\n'


@pytest.mark.parametrize('returned, code', [(None, 0), (0, 0), (143, 143), (130, 130)])
def test_what_main_returns_is_the_exit_code(returned, code, script_path, capsys):
    seen = []

    def main(argv):
        seen.append(argv)
        return returned

    assert cli.guarded_main(main, ['--epochs', '1']) == code
    assert seen == [['--epochs', '1']]
    assert cli.guarded_main(main) == code  # argv None: main parses sys.argv[1:] itself
    assert seen[-1] is None
    assert capsys.readouterr().err == ''


@pytest.mark.parametrize('error', [ValueError('a bug'), KeyError('k'), KeyboardInterrupt()])
def test_other_exceptions_propagate(error, script_path, capsys):
    """Only the errors worded for the user become a line: a bug keeps its traceback."""
    def main(argv):
        raise error

    with pytest.raises(type(error)):
        cli.guarded_main(main)
    assert capsys.readouterr().err == ''


def test_system_exit_passes_through(script_path):
    """argparse's errors (and a second Ctrl-C) exit from inside main with their own code."""
    def main(argv):
        sys.exit(130)

    with pytest.raises(SystemExit) as e:
        cli.guarded_main(main)
    assert e.value.code == 130


def test_prog_names_a_module_run_with_dash_m(script_path, capsys):
    """Under `python3 -m benchmarks.recipes` argv[0] is a file path; prog names the command instead."""
    def main(argv):
        raise errors.UsageError('--steps must be at least 1 (got 0).')

    assert cli.guarded_main(main, [], prog='python3 -m benchmarks.recipes') == 2
    assert capsys.readouterr().err == 'python3 -m benchmarks.recipes: error: --steps must be at least 1 (got 0).\n'


# ---------------------------------------------------------------- the loss-scale warning

@pytest.mark.parametrize('flags, scale, warned', [
    ([], 1.0, False),
    (['--static-loss-scale', '1'], 1.0, False),
    (['--static-loss-scale', '64'], 1.0, True),
    (['--amp', '--static-loss-scale', '64'], 1.0, True),
    (['--fp16'], 128.0, False),
    (['--fp16', '--static-loss-scale', '64'], 64.0, False),
])
def test_static_loss_scale_warning_and_default(flags, scale, warned, capsys):
    """--static-loss-scale defaults to 128 with --fp16, else 1; a scale the user gave without --fp16
    is reset to 1 with a warning; no warning otherwise."""
    from plumbing import cli
    args = cli.training_parser('test').parse_args(['--data', '.', *flags])
    assert args.static_loss_scale == (float(flags[flags.index('--static-loss-scale') + 1])
                                      if '--static-loss-scale' in flags else None)
    cli.check_training_args(args)
    assert args.static_loss_scale == scale
    out, err = capsys.readouterr()
    warning = ('Warning:  static_loss_scale != 1.0 is only necessary with --fp16. '
               'Resetting static_loss_scale to 1.0')
    assert (warning in out.splitlines()) == warned, out
    assert 'static_loss_scale' not in err
    if not warned:
        assert 'static_loss_scale' not in out
