"""Next-token cross-entropy, returned as a sum and a count so callers can normalise globally.

Dividing each micro-batch's loss by its own token count and then averaging gives the wrong
gradient when micro-batches (or ranks) hold different numbers of valid tokens. Returning the
sum and the count lets the train loop divide by the number of valid tokens in the whole
optimizer step, across accumulation steps and ranks: the gradient of one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # label value that contributes neither loss nor count (padding, prompts)


def next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of logits[:, :-1] against labels[:, 1:].

    logits: (B, T, V) in any dtype; the loss is computed in fp32.
    labels: (B, T) token ids, IGNORE_INDEX where no loss is wanted.
    Returns (loss summed over valid tokens, number of valid tokens), both 0-dim tensors.
    """
    predictions = logits[:, :-1].reshape(-1, logits.size(-1)).float()  # (B*(T-1), V)
    targets = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    loss_sum = F.cross_entropy(predictions, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, count_valid_tokens(labels)


def count_valid_tokens(labels: torch.Tensor) -> torch.Tensor:
    """How many positions of `labels` (B, T) next_token_loss scores: the shifted, non-ignored ones."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def mean_next_token_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The mean over valid tokens (what a model's forward reports); 0 when none are valid."""
    loss_sum, valid_tokens = next_token_loss(logits, labels)
    return loss_sum / valid_tokens.clamp(min=1)


# ---- the output head and the loss in one pass (train.fused_loss) -------------------------------
#
# With a 32000-token vocabulary the logits of a (B, T) batch are a (B, T, V) fp32 tensor of
# B*T*128 KB; the plain path makes several of them per step (logits, the shifted copy,
# log-probabilities and their gradients), and on CPU allocating and page-faulting them costs as
# much as a third of the step. The fused path walks the rows in chunks that fit a reused buffer,
# and for each chunk computes the loss *and* the gradient of the summed loss with respect to the
# hidden states and the head weight (softmax - one-hot): nothing (B, T, V)-sized is ever made and
# nothing is recomputed. Backward then only scales the stored gradients by the incoming scalar.

# Logits per chunk: 2**24 fp32 values = 64 MiB, 524 rows at V = 32000. Smaller chunks re-read and
# re-write the (V, C) weight gradient more often; larger ones cost memory for little gain
# (measured in docs/08-performance.md).
FUSED_CHUNK_ELEMENTS = 2**24


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of (hidden @ weight.T) against targets, gradients made in forward."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows: int, needs_grad: bool):
        # hidden (N, C) and weight (V, C) share one compute dtype; targets (N,) with IGNORE_INDEX.
        valid = targets != IGNORE_INDEX  # (N,)
        safe_targets = torch.where(valid, targets, 0)[:, None]  # (N, 1): any class for ignored rows
        loss_sum = torch.zeros((), device=hidden.device, dtype=torch.float32)
        grad_hidden = torch.empty_like(hidden) if needs_grad else None
        grad_weight = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if needs_grad else None
        n_rows, vocab = hidden.size(0), weight.size(0)
        buffer_rows = min(chunk_rows, n_rows)  # two (rows, V) buffers, reused by every chunk
        logits_buffer = torch.empty(buffer_rows, vocab, device=hidden.device, dtype=hidden.dtype)
        log_probs_buffer = torch.empty(buffer_rows, vocab, device=hidden.device, dtype=torch.float32)
        for start in range(0, n_rows, chunk_rows):
            end = min(start + chunk_rows, n_rows)
            chunk_hidden, chunk_targets = hidden[start:end], safe_targets[start:end]  # (n, C), (n, 1)
            row_valid = valid[start:end, None]  # (n, 1)
            logits = torch.mm(chunk_hidden, weight.t(), out=logits_buffer[: end - start])  # (n, V)
            log_probs = torch.log_softmax(logits, dim=-1, dtype=torch.float32, out=log_probs_buffer[: end - start])
            picked = log_probs.gather(1, chunk_targets).squeeze(1)  # (n,) log p[target]
            loss_sum -= torch.where(row_valid.squeeze(1), picked, 0.0).sum()
            if not needs_grad:
                continue
            # d(sum of -log p[target]) / d(logits) = softmax - one_hot, and zero on ignored rows:
            # rather than zeroing (n, V) rows, the ignored rows of the hidden states are zeroed for
            # the weight gradient and their rows of the hidden-state gradient afterwards.
            grad_logits = log_probs.exp_().scatter_add_(1, chunk_targets, -row_valid.float())
            grad_logits = grad_logits.to(hidden.dtype)  # (n, V), a no-op in fp32
            torch.mm(grad_logits, weight, out=grad_hidden[start:end])
            grad_hidden[start:end] *= row_valid
            masked_hidden = chunk_hidden * row_valid  # (n, C)
            if grad_weight.dtype == grad_logits.dtype:
                grad_weight.addmm_(grad_logits.t(), masked_hidden)
            else:  # low-precision matmul, accumulated over chunks in fp32
                grad_weight += grad_logits.t() @ masked_hidden
        if needs_grad:
            ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight = ctx.saved_tensors
        scale = grad_loss.float()  # the loop's 1 / (valid tokens), times the fp16 loss scale if any
        return ((grad_hidden * scale).to(grad_hidden.dtype), (grad_weight * scale).to(grad_weight.dtype),
                None, None, None)


def head_compute_dtype(hidden: torch.Tensor, head_weight: torch.Tensor) -> torch.dtype:
    """The dtype the head's matmul runs in: autocast's when it is on, else the wider of the two inputs'."""
    if torch.is_autocast_enabled(hidden.device.type):
        return torch.get_autocast_dtype(hidden.device.type)
    return torch.promote_types(hidden.dtype, head_weight.dtype)


def fused_next_token_loss(
    hidden: torch.Tensor, head_weight: torch.Tensor, labels: torch.Tensor, chunk_rows: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """next_token_loss(hidden @ head_weight.T, labels) without materialising the (B, T, V) logits.

    hidden: (B, T, C) final-norm output; head_weight: (V, C), the output head's weight (a plain
    tensor: under FSDP call this inside the module's forward, where the weight is unsharded).
    Under autocast the matmuls run in the autocast dtype; the softmax and the loss in fp32.
    Returns (loss summed over valid tokens, number of valid tokens), as next_token_loss does.
    `chunk_rows` defaults to FUSED_CHUNK_ELEMENTS // V.
    """
    chunk_rows = chunk_rows or max(1, FUSED_CHUNK_ELEMENTS // head_weight.size(0))
    device_type = hidden.device.type
    compute_dtype = head_compute_dtype(hidden, head_weight)
    rows = hidden[:, :-1].reshape(-1, hidden.size(-1)).to(compute_dtype)  # (B*(T-1), C)
    targets = labels[:, 1:].reshape(-1)  # (B*(T-1),)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or head_weight.requires_grad)
    with torch.autocast(device_type, enabled=False):
        loss_sum = _ChunkedLinearCrossEntropy.apply(
            rows, head_weight.to(compute_dtype), targets, chunk_rows, needs_grad
        )
    return loss_sum, count_valid_tokens(labels)
