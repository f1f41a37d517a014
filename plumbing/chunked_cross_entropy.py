"""A CPU speed trick for fp16/bf16 logits: cross-entropy computed in fp32 a few rows at a time.

F.cross_entropy under autocast first copies all N * V logits to fp32 (and the gradient
back); on a CPU, where the logits do not fit in cache, those passes cost as much as the
decoder's matrix product. Here each chunk of rows is widened to fp32 while it is in cache.
The math is F.cross_entropy's: the forward keeps only each row's log-sum-exp; the backward
recomputes the chunk's softmax and writes (softmax - one_hot) * grad / N, rounded once.
"""
import torch

CHUNK_BYTES = 4 << 20  # a chunk of fp32 logits that stays in a CPU's cache


class ChunkedCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of logits [N, V] against targets [N], in fp32, rows_per_chunk rows at a time."""

    @staticmethod
    def forward(ctx, logits, targets, rows_per_chunk):
        lse = torch.empty(logits.size(0), 1, dtype=torch.float32, device=logits.device)
        for rows in chunks(logits.size(0), rows_per_chunk):
            lse[rows] = torch.logsumexp(logits[rows].float(), 1, keepdim=True)
        ctx.save_for_backward(logits, targets, lse)
        ctx.rows_per_chunk = rows_per_chunk
        target_logits = logits.gather(1, targets[:, None]).float()
        return (lse - target_logits).mean()

    @staticmethod
    def backward(ctx, grad_loss):
        logits, targets, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        scale = grad_loss.float() / logits.size(0)
        for rows in chunks(logits.size(0), ctx.rows_per_chunk):
            probs = logits[rows].float().sub_(lse[rows]).exp_()
            t = targets[rows, None]
            probs.scatter_add_(1, t, torch.full_like(t, -1, dtype=probs.dtype))
            grad[rows] = probs.mul_(scale)
        return grad, None, None


def chunks(n, size):
    return (slice(start, start + size) for start in range(0, n, size))


def chunked_cross_entropy(logits, targets):
    """Mean cross-entropy of low-precision logits on a CPU, in cache-sized chunks of rows."""
    rows = max(1, CHUNK_BYTES // (logits.size(1) * 4))
    return ChunkedCrossEntropy.apply(logits, targets, rows)
