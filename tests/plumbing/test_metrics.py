"""plumbing/metrics.py: SAVE.metrics.jsonl holds a record per progress line, epoch and test."""
import re

import pytest
import torch

from conftest import SMALL, describe, records

FIELDS = {
    'run': {'kind', 'script', 'flags', 'recipe', 'precision', 'torch', 'device', 'processes', 'batches_per_epoch',
            'epoch', 'batch', 'resumed', 'elapsed'},
    'train': {'kind', 'epoch', 'batch', 'step', 'lr', 'loss', 'ppl', 'ms_per_batch', 'tokens_per_s', 'loss_scale',
              'skipped', 'elapsed'},
    'epoch': {'kind', 'epoch', 'valid_loss', 'valid_ppl', 'epoch_seconds', 'best', 'lr', 'skipped', 'elapsed'},
    'end': {'kind', 'test_loss', 'test_ppl', 'stopped', 'epoch', 'batch', 'best_val_loss', 'skipped', 'elapsed'},
}


def test_a_run_writes_a_record_per_progress_line_epoch_and_test(tmp_path, call_script, corpus_dir):
    proc = call_script('main.py', '--data', corpus_dir, *SMALL, '--epochs', 2, '--fp16', cwd=tmp_path)
    assert proc.returncode == 0, describe(proc)
    recs = records(tmp_path)
    for r in recs:
        assert set(r) == FIELDS[r['kind']], r
    run, *rest, end = recs
    assert run['kind'] == 'run' and end['kind'] == 'end'
    assert run['recipe'] == 'fp16-manual' and run['torch'] == torch.__version__ and run['script'] == 'main.py'
    assert run['flags']['epochs'] == 2 and run['flags']['fp16'] is True and run['resumed'] is False
    assert 'cores' in run['device']

    lines = re.findall(r'^\| epoch +(\d+) \| +(\d+)/ *(\d+) batches .*\| loss +([\d.]+) \|.*\| loss scale (\S+)',
                       proc.stdout, re.M)
    train = [r for r in recs if r['kind'] == 'train']
    assert len(train) == len(lines) > 2
    for r, (epoch, batch, nbatches, loss, scale) in zip(train, lines):
        assert (r['epoch'], r['batch'], f"{r['loss']:5.2f}".strip(), r['loss_scale']) == (
            int(epoch), int(batch), loss, float(scale))
        assert r['step'] == (r['epoch'] - 1) * int(nbatches) + r['batch'] and int(nbatches) == run['batches_per_epoch']
        assert r['ppl'] == pytest.approx(2.718281828 ** r['loss'])

    epochs = [r for r in recs if r['kind'] == 'epoch']
    valid = re.findall(r'\| valid ppl +([\d.]+)', proc.stdout)
    assert [f"{r['valid_ppl']:.2f}" for r in epochs] == valid and [r['epoch'] for r in epochs] == [1, 2]
    assert epochs[0]['best'] is True and epochs[1]['best'] == (epochs[1]['valid_loss'] < epochs[0]['valid_loss'])
    assert epochs[1]['lr'] == (5.0 if epochs[1]['best'] else 1.25)  # after annealing
    assert f"{end['test_ppl']:.2f}" == re.search(r'test ppl +([\d.]+)', proc.stdout).group(1)
    assert end['stopped'] is False and end['best_val_loss'] == min(r['valid_loss'] for r in epochs)
    times = [r['elapsed'] for r in recs]
    assert times == sorted(times)
