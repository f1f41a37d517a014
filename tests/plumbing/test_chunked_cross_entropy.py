"""plumbing/chunked_cross_entropy.py: F.cross_entropy's loss and gradient, on the CPU in chunks."""
import pytest
import torch
import torch.nn.functional as F

import training
from plumbing.chunked_cross_entropy import ChunkedCrossEntropy


@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('rows', [1, 7, 64])
def test_chunked_cross_entropy_matches_f_cross_entropy(dtype, rows):
    g = torch.Generator().manual_seed(3)
    logits = (torch.randn(50, 300, generator=g) * 4).to(dtype)
    logits[0, 5] = -60  # a target far below the row's max: exp underflows in the softmax, not in the loss
    targets = torch.randint(300, (50,), generator=g)
    targets[0] = 5
    ours_in = logits.clone().requires_grad_()
    ours = ChunkedCrossEntropy.apply(ours_in, targets, rows)
    (ours * 3).backward()
    ref_in = logits.clone().requires_grad_()
    ref = F.cross_entropy(ref_in.float(), targets)
    (ref * 3).backward()
    assert ours.dtype == torch.float32
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-5)
    assert ours_in.grad.dtype == dtype
    torch.testing.assert_close(ours_in.grad.float(), ref_in.grad.float(), rtol=0, atol=2 * torch.finfo(dtype).eps * 3 / 50)


def test_cross_entropy_routes_by_dtype():
    logits = torch.randn(4, 10)
    targets = torch.tensor([1, 2, 3, 4])
    assert torch.equal(training.cross_entropy(logits, targets), F.cross_entropy(logits, targets))
    low = training.cross_entropy(logits.bfloat16().requires_grad_(), targets)
    assert low.grad_fn is not None and 'ChunkedCrossEntropy' in type(low.grad_fn).__name__
