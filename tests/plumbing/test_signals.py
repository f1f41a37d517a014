"""plumbing/signals.py: a signal found behind the RuntimeError that torch.save raises during it."""
import io
import signal
import sys

import pytest
import torch

from plumbing import cli, errors, signals


class InterruptedWrite(io.RawIOBase):
    """A file whose second write raises error, as a signal handler landing there would."""

    def __init__(self, error):
        self.error, self.writes = error, 0

    def writable(self):
        return True

    def write(self, b):
        self.writes += 1
        if self.writes == 2:  # torch.save passes an error in the first write through unwrapped
            raise self.error
        return len(b)


@pytest.mark.parametrize('error, rc, stderr', [
    (signals.SecondSignal(signal.SIGINT), 130, ''),
    (signals.Interrupted(signal.SIGTERM), 143, 'main.py: error: interrupted by SIGTERM before anything was saved.\n'),
], ids=['second-signal', 'interrupted'])
def test_a_signal_is_found_behind_the_runtime_error_of_torch_save(error, rc, stderr, monkeypatch, capsys):
    """torch.save's zip writer raises a RuntimeError of its own while the signal's exception propagates;
    checkpoint.load would word such an error as a corrupt file. cli.run finds the signal behind both."""
    def main(argv):
        try:
            torch.save({'weights': torch.zeros(1000)}, InterruptedWrite(error))
        except RuntimeError:
            raise errors.CheckpointError('model.pt is corrupt.') from None

    monkeypatch.setattr(sys, 'argv', ['/some/dir/main.py'])
    assert cli.guarded_main(main) == rc
    assert capsys.readouterr().err == stderr
