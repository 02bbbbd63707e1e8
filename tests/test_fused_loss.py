"""The fused head + cross-entropy (train.fused_loss) gives the plain path's loss and gradients."""

import pytest
import torch

from nanotrain.config import ModelConfig
from nanotrain.model.loss import IGNORE_INDEX, fused_next_token_loss, next_token_loss
from nanotrain.model.transformer import build_model


def loss_and_grads(hidden, weight, labels, fused: bool, chunk_rows: int = 7, scale: float = 0.37):
    hidden, weight = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
    if fused:
        loss_sum, valid = fused_next_token_loss(hidden, weight, labels, chunk_rows=chunk_rows)
    else:
        loss_sum, valid = next_token_loss(hidden @ weight.t(), labels)
    (loss_sum * scale).backward()  # a non-unit upstream gradient, like the loop's 1 / valid tokens
    return loss_sum.detach(), valid, hidden.grad, weight.grad


@pytest.mark.parametrize("chunk_rows", [1, 7, 64, 10_000])  # chunks that do and do not divide the rows
def test_fused_equals_plain_with_ignored_labels(chunk_rows):
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(3, 17, 16, generator=g), torch.randn(50, 16, generator=g)
    labels = torch.randint(0, 50, (3, 17), generator=g)
    labels[0, 3:9] = IGNORE_INDEX
    labels[2] = IGNORE_INDEX  # a row with nothing to score
    plain = loss_and_grads(hidden, weight, labels, fused=False)
    fused = loss_and_grads(hidden, weight, labels, fused=True, chunk_rows=chunk_rows)
    assert fused[1].item() == plain[1].item() == 2 * 16 - 6
    torch.testing.assert_close(fused[0], plain[0], rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(fused[2], plain[2], rtol=1e-5, atol=1e-6)  # d loss / d hidden
    torch.testing.assert_close(fused[3], plain[3], rtol=1e-5, atol=1e-6)  # d loss / d head weight
    assert fused[2][2].abs().sum() == 0 and fused[2][:, -1].abs().sum() == 0  # unscored rows get nothing


def test_without_grad_only_the_loss_is_computed():
    hidden, weight = torch.randn(2, 9, 8, requires_grad=True), torch.randn(30, 8, requires_grad=True)
    labels = torch.randint(0, 30, (2, 9))
    with torch.no_grad():
        loss_sum, _ = fused_next_token_loss(hidden, weight, labels, chunk_rows=4)
    assert not loss_sum.requires_grad
    torch.testing.assert_close(loss_sum, next_token_loss(hidden @ weight.t(), labels)[0].detach())


def test_bf16_autocast_keeps_the_loss_in_fp32_and_close_to_plain():
    g = torch.Generator().manual_seed(1)
    hidden, weight = torch.randn(2, 33, 32, generator=g), torch.randn(100, 32, generator=g) * 0.2
    labels = torch.randint(0, 100, (2, 33), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused, _ = fused_next_token_loss(hidden, weight, labels, chunk_rows=16)
        plain, _ = next_token_loss(hidden @ weight.t(), labels)
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, plain, rtol=2e-3, atol=0.0)  # both run the matmul in bf16


@pytest.mark.parametrize("flavour, tied", [("llama", False), ("llama", True), ("gpt", False)])
def test_model_forward_fused_equals_plain(flavour, tied):
    cfg = ModelConfig(flavour=flavour, vocab_size=97, max_position_embeddings=32, n_layers=2, n_heads=4,
                      n_kv_heads=2 if flavour == "llama" else 0, d_model=32, d_ff=64, tie_embeddings=tied)
    ids = torch.randint(0, 97, (3, 20), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    labels[1, :7] = IGNORE_INDEX
    mask = torch.ones_like(ids)
    mask[1, :7] = 0  # left padding, as the padded data mode makes it
    results = []
    for fused in (False, True):
        model = build_model(cfg, seed=4)
        logits, loss_sum = model(ids, mask, labels=labels, loss_reduction="sum", fused_loss=fused)
        loss_sum.backward()
        assert (logits is None) == fused
        results.append((loss_sum.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (plain_loss, plain_grads), (fused_loss, fused_grads) = results
    torch.testing.assert_close(fused_loss, plain_loss, rtol=1e-6, atol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(fused_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    mean_loss = build_model(cfg, seed=4)(ids, mask, labels=labels, fused_loss=True)[1]
    torch.testing.assert_close(mean_loss, plain_loss / (labels[:, 1:] != IGNORE_INDEX).sum())
