"""Loss: next-token cross-entropy by hand, ignored labels, and the sum/count contract."""

import math

import torch

from nanotrain.model.loss import IGNORE_INDEX, count_valid_tokens, mean_next_token_loss, next_token_loss


def test_loss_equals_hand_computation_with_ignored_labels():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5)
    labels = torch.tensor([[1, 2, 3, 4], [0, IGNORE_INDEX, 2, IGNORE_INDEX]])
    expected_terms = []
    for b in range(2):
        for t in range(3):  # position t predicts label t + 1
            target = labels[b, t + 1].item()
            if target == IGNORE_INDEX:
                continue
            log_probs = logits[b, t] - torch.logsumexp(logits[b, t], dim=0)
            expected_terms.append(-log_probs[target].item())
    loss_sum, valid = next_token_loss(logits, labels)
    assert valid.item() == len(expected_terms) == 4
    assert math.isclose(loss_sum.item(), sum(expected_terms), rel_tol=1e-6)
    assert math.isclose(mean_next_token_loss(logits, labels).item(), sum(expected_terms) / 4, rel_tol=1e-6)
    assert count_valid_tokens(labels).item() == 4


def test_first_label_is_never_scored():
    logits = torch.randn(1, 3, 7)
    labels = torch.tensor([[5, IGNORE_INDEX, IGNORE_INDEX]])
    loss_sum, valid = next_token_loss(logits, labels)
    assert valid.item() == 0 and loss_sum.item() == 0.0
    assert mean_next_token_loss(logits, labels).item() == 0.0


def test_sums_compose_across_micro_batches():
    torch.manual_seed(1)
    logits = torch.randn(4, 6, 11)
    labels = torch.randint(0, 11, (4, 6))
    labels[0, 2:] = IGNORE_INDEX  # micro-batches with different numbers of valid tokens
    whole_sum, whole_count = next_token_loss(logits, labels)
    part_sums = [next_token_loss(logits[i : i + 2], labels[i : i + 2]) for i in (0, 2)]
    assert torch.allclose(sum(s for s, _ in part_sums), whole_sum)
    assert sum(c for _, c in part_sums) == whole_count


def test_loss_is_computed_in_fp32_for_low_precision_logits():
    logits = torch.randn(2, 5, 9).to(torch.bfloat16)
    labels = torch.randint(0, 9, (2, 5))
    loss_sum, _ = next_token_loss(logits, labels)
    assert loss_sum.dtype == torch.float32
