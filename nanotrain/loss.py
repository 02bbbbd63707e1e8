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
