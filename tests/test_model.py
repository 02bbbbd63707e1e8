"""The Transformer's behaviour: shapes, causality, padding, GQA, init, sizes and the KV cache."""

import dataclasses
import math
import typing

import pytest
import torch

from nanotrain.config import FEATURES, Flavour, FlavourFeatures, ModelConfig, load_config, preset_names
from nanotrain.hf.llama import hf_llama_name, nanotrain_name_from_hf
from nanotrain.model.transformer import build_model, flops_per_token, num_parameters, parameter_report

FLAVOURS = ["gpt", "llama"]


def tiny_config(flavour: str, **overrides) -> ModelConfig:
    fields = dict(
        flavour=flavour, vocab_size=64, max_position_embeddings=32, n_layers=2, n_heads=4,
        n_kv_heads=2 if flavour == "llama" else 0, d_model=32, d_ff=64, norm_eps=1e-5, init_std=0.1,
    )
    return ModelConfig(**(fields | overrides))


def tiny_model(flavour: str, seed: int = 0, **overrides):
    return build_model(tiny_config(flavour, **overrides), seed=seed).eval()


def random_ids(batch: int, length: int, vocab: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_shapes_and_loss(flavour):
    model = tiny_model(flavour)
    ids = random_ids(3, 10)
    logits, loss = model(ids)
    assert logits.shape == (3, 10, 64) and loss is None
    logits, loss = model(ids, labels=ids)
    assert loss.shape == () and torch.isfinite(loss)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_changing_a_later_token_never_changes_earlier_logits(flavour):
    model = tiny_model(flavour)
    ids = random_ids(1, 12)
    changed = ids.clone()
    changed[0, 7] = (ids[0, 7] + 1) % 64
    with torch.no_grad():
        before, after = model(ids)[0], model(changed)[0]
    torch.testing.assert_close(before[:, :7], after[:, :7], rtol=0, atol=0)
    assert not torch.allclose(before[:, 7:], after[:, 7:])


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_left_padding_gives_the_unpadded_logits_at_real_positions(flavour):
    model = tiny_model(flavour)
    long_row, short_row = random_ids(1, 10, seed=1)[0], random_ids(1, 6, seed=2)[0]
    pad = 4
    ids = torch.stack([long_row, torch.cat([torch.zeros(pad, dtype=torch.long), short_row])])
    mask = torch.ones_like(ids)
    mask[1, :pad] = 0
    with torch.no_grad():
        padded = model(ids, attention_mask=mask)[0]
        alone_long = model(long_row[None])[0]
        alone_short = model(short_row[None])[0]
    assert torch.isfinite(padded).all(), "fully masked padding queries must stay finite"
    torch.testing.assert_close(padded[0], alone_long[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(padded[1, pad:], alone_short[0], rtol=1e-5, atol=1e-5)


def test_gqa_equals_mha_when_kv_weights_are_repeated():
    gqa = tiny_model("llama", n_heads=4, n_kv_heads=2)
    mha = tiny_model("llama", n_heads=4, n_kv_heads=4, seed=1)
    group, head_dim, d_model = 2, 8, 32
    state = gqa.state_dict()
    for name, weight in list(state.items()):
        if name.endswith(("k_proj.weight", "v_proj.weight")):  # (Hkv * hd, C) -> (H * hd, C)
            per_head = weight.view(-1, head_dim, d_model)
            state[name] = per_head.repeat_interleave(group, dim=0).reshape(-1, d_model)
    mha.load_state_dict(state)
    ids = random_ids(2, 12)
    with torch.no_grad():
        torch.testing.assert_close(gqa(ids)[0], mha(ids)[0], rtol=1e-5, atol=1e-5)


def test_tinystories_20m_has_exactly_19_532_032_parameters():
    model = build_model(load_config("tinystories-20m").model)
    assert num_parameters(model) == 19_532_032


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_loss_at_init_is_close_to_ln_vocab(flavour):
    model = tiny_model(flavour, vocab_size=512, init_std=0.02)
    ids = random_ids(4, 32, vocab=512)
    with torch.no_grad():
        loss = model(ids, labels=ids)[1]
    assert abs(loss.item() - math.log(512)) < 0.1


def test_init_depends_only_on_the_seed_and_leaves_the_global_rng_alone():
    rng_before = torch.get_rng_state()
    a, b, c = (build_model(tiny_config("llama"), seed=s).state_dict() for s in (7, 7, 8))
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.attn.q_proj.weight"], c["blocks.0.attn.q_proj.weight"])


def test_init_scales_residual_projections_and_sets_norms_and_biases():
    model = build_model(tiny_config("gpt", n_layers=8, d_model=64, d_ff=256, init_std=0.02))
    std = 0.02 / math.sqrt(2 * 8)
    for block in model.blocks.values():
        assert torch.equal(block.attn_norm.weight, torch.ones(64))
        assert torch.equal(block.attn_norm.bias, torch.zeros(64))
        assert torch.equal(block.attn.q_proj.bias, torch.zeros(64))
    blocks = list(model.blocks.values())
    residual = torch.cat([w.flatten() for b in blocks for w in (b.attn.o_proj.weight, b.mlp.down_proj.weight)])
    others = torch.cat([b.mlp.up_proj.weight.flatten() for b in blocks])
    assert abs(residual.std().item() - std) < 0.1 * std
    assert abs(others.std().item() - 0.02) < 0.002


def test_tied_embeddings_share_storage_and_count_once():
    untied = tiny_model("llama")
    tied = tiny_model("llama", tie_embeddings=True)
    assert tied.lm_head.weight.data_ptr() == tied.tok_embeddings.weight.data_ptr()
    assert num_parameters(untied) - num_parameters(tied) == 64 * 32
    assert "tied to tok_embeddings" in parameter_report(tied)
    assert f"{num_parameters(tied):,}" in parameter_report(tied).splitlines()[-1]


def test_parameter_report_lists_each_block_and_the_total():
    model = build_model(load_config("tinystories-20m").model)
    report = parameter_report(model)
    assert report.splitlines()[-1].split()[:2] == ["total", "19,532,032"]
    assert sum(line.startswith("blocks.") for line in report.splitlines()) == 4


def test_flops_per_token_counts_six_per_matmul_weight_plus_attention():
    cfg = tiny_config("llama")
    model = build_model(cfg)
    norm_params = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    matmul_params = num_parameters(model, exclude_embeddings=True) - norm_params  # head included
    assert flops_per_token(cfg, 16) == 6 * matmul_params + 12 * cfg.n_layers * cfg.d_model * 16


def test_dropout_acts_in_training_only():
    model = tiny_model("gpt", dropout=0.5)
    ids = random_ids(2, 8)
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(ids)[0], model(ids)[0])
        model.eval()
        assert torch.equal(model(ids)[0], model(ids)[0])


def test_bad_inputs_give_clear_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(random_ids(1, 33))
    with pytest.raises(ValueError, match="attention_mask must have shape"):
        model(random_ids(1, 8), attention_mask=torch.ones(1, 9, dtype=torch.long))
    cache = model.new_kv_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache holds 4"):
        model(random_ids(1, 5), kv_cache=cache)
    with pytest.raises(ValueError, match=r"positions must have shape \(1, 8\)"):
        model(random_ids(1, 8), positions=torch.arange(7)[None])


def test_hf_llama_names_cover_every_parameter_and_invert():
    for tie in (False, True):
        model = tiny_model("llama", tie_embeddings=tie)
        for name in model.state_dict():
            assert nanotrain_name_from_hf(hf_llama_name(name)) == name
    assert hf_llama_name("blocks.1.attn.k_proj.weight") == "model.layers.1.self_attn.k_proj.weight"
    with pytest.raises(KeyError, match="no counterpart"):
        hf_llama_name("pos_embeddings.weight")


# ---- KV cache: greedy decoding with the cache equals full recomputation ----------------------------

def greedy_without_cache(model, ids, mask, new_tokens):
    for _ in range(new_tokens):
        next_id = model(ids, attention_mask=mask)[0][:, -1].argmax(-1, keepdim=True)  # (B, 1)
        ids, mask = torch.cat([ids, next_id], 1), torch.cat([mask, torch.ones_like(next_id)], 1)
    return ids


def greedy_with_cache(model, ids, mask, new_tokens):
    cache = model.new_kv_cache(ids.size(0), ids.size(1) + new_tokens)
    logits = model(ids, attention_mask=mask, kv_cache=cache)[0]
    for _ in range(new_tokens):
        next_id = logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        ids = torch.cat([ids, next_id], 1)
        mask = None if mask is None else torch.cat([mask, torch.ones_like(next_id)], 1)
        logits = model(next_id, attention_mask=mask, kv_cache=cache)[0]
    assert cache.length == ids.size(1)
    return ids


@pytest.mark.parametrize("flavour", FLAVOURS)
@torch.no_grad()
def test_kv_cache_greedy_decoding_equals_recomputation(flavour):
    model = tiny_model(flavour)
    prompt = random_ids(1, 5)
    expected = greedy_without_cache(model, prompt, torch.ones_like(prompt), 12)
    assert torch.equal(greedy_with_cache(model, prompt, None, 12), expected)
    assert torch.equal(greedy_with_cache(model, prompt, torch.ones_like(prompt), 12), expected)
    assert len(set(expected[0, 5:].tolist())) > 1, "a degenerate model would make this test vacuous"


@pytest.mark.parametrize("flavour", FLAVOURS)
@torch.no_grad()
def test_kv_cache_left_padded_batch_equals_one_by_one(flavour):
    model = tiny_model(flavour)
    prompts = [random_ids(1, 7, seed=3)[0], random_ids(1, 3, seed=4)[0]]
    width = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=torch.long), p]) for p in prompts])
    mask = torch.stack([(torch.arange(width) >= width - len(p)).long() for p in prompts])
    batched = greedy_with_cache(model, ids, mask, 10)
    for row, prompt in enumerate(prompts):
        alone = greedy_without_cache(model, prompt[None], torch.ones_like(prompt[None]), 10)
        assert torch.equal(batched[row, width - len(prompt):], alone[0])


def test_config_fields_reach_the_model():
    cfg = dataclasses.replace(tiny_config("llama"), norm_eps=1e-3)
    model = build_model(cfg)
    assert model.config is cfg and model.norm.eps == 1e-3
    assert len(model.blocks) == cfg.n_layers and model.blocks["0"].attn.k_proj.out_features == 2 * cfg.head_dim


# ---- flavours are features: the model asks cfg.features, never the flavour's name ----------------

def test_every_flavour_has_one_row_of_features_and_presets_name_known_flavours():
    assert typing.get_args(Flavour) == tuple(FEATURES)  # a new flavour is named in both, in the same order
    assert {load_config(name).model.flavour for name in preset_names()} <= set(FEATURES)


def test_a_third_flavour_is_one_row_of_features(monkeypatch):
    # A llama with biases and a GELU MLP: no code in model/transformer.py names it, yet it builds and trains.
    hybrid = FlavourFeatures(norm="rmsnorm", mlp="gelu", positions="rope", bias=True, grouped_query_attention=True)
    monkeypatch.setitem(FEATURES, "hybrid", hybrid)
    cfg = tiny_config("hybrid", n_kv_heads=2)
    model = build_model(cfg).train()
    names = set(model.state_dict())
    assert "blocks.0.attn.q_proj.bias" in names and "blocks.0.mlp.up_proj.bias" in names
    assert "blocks.0.mlp.gate_proj.weight" not in names and "pos_embeddings.weight" not in names
    assert type(model.norm).__name__ == "RMSNorm" and "bias" not in dict(model.norm.named_parameters())
    ids = random_ids(2, 10)
    model(ids, labels=ids)[1].backward()
    assert model.blocks["0"].mlp.up_proj.bias.grad.abs().sum() > 0  # the biases are in the graph
    norm_params = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    bias_params = sum(p.numel() for n, p in model.named_parameters() if n.endswith("bias"))
    matmul_params = num_parameters(model, exclude_embeddings=True) - norm_params - bias_params
    assert flops_per_token(cfg, 16) == 6 * matmul_params + 12 * cfg.n_layers * cfg.d_model * 16  # 2 MLP matrices


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_each_flavour_builds_the_blocks_its_features_name(flavour):
    features = FEATURES[flavour]
    model = tiny_model(flavour)
    names = set(model.state_dict())
    assert ("pos_embeddings.weight" in names) == (features.positions == "learned")
    assert ("blocks.1.mlp.gate_proj.weight" in names) == (features.mlp == "swiglu")
    assert ("blocks.1.attn.o_proj.bias" in names) == features.bias
    assert ("norm.bias" in names) == (features.norm == "layernorm")  # LayerNorm has a bias, RMSNorm none


# ---- pipeline stages and positions as an input ---------------------------------------------------

def split_into_stages(flavour: str, cuts: list[int], **overrides) -> list:
    """Whole models cut into stages by `keep_only`: blocks [cuts[i], cuts[i + 1]), embeddings first, head last."""
    return [
        tiny_model(flavour, **overrides).keep_only(range(a, b), embeddings=a == 0, head=b == cuts[-1])
        for a, b in zip(cuts, cuts[1:])
    ]


@pytest.mark.parametrize("flavour, tied", [("gpt", False), ("llama", False), ("llama", True)])
@torch.no_grad()
def test_stages_run_in_turn_give_the_whole_models_logits_and_loss(flavour, tied):
    whole = tiny_model(flavour, n_layers=4, tie_embeddings=tied)
    stages = split_into_stages(flavour, [0, 1, 3, 4], n_layers=4, tie_embeddings=tied)
    ids, mask = random_ids(2, 12), torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # left padding reaches every stage through the mask
    hidden = ids
    for stage in stages[:-1]:
        hidden, loss = stage(hidden, attention_mask=mask)
        assert hidden.shape == (2, 12, 32) and loss is None
    logits, loss = stages[-1](hidden, attention_mask=mask, labels=ids)
    expected_logits, expected_loss = whole(ids, attention_mask=mask, labels=ids)
    assert torch.equal(logits, expected_logits) and torch.equal(loss, expected_loss)


@pytest.mark.parametrize("flavour, tied", [("gpt", False), ("llama", False), ("llama", True)])
def test_stages_keep_the_whole_models_parameter_names_and_values(flavour, tied):
    whole = tiny_model(flavour, n_layers=4, tie_embeddings=tied).state_dict()
    first, middle, last = (stage.state_dict() for stage in split_into_stages(flavour, [0, 1, 3, 4], n_layers=4,
                                                                              tie_embeddings=tied))
    assert {key.split(".")[1] for key in middle} == {"1", "2"}  # global block indices, no embeddings or head
    assert "tok_embeddings.weight" in first and "lm_head.weight" in last and "norm.weight" not in first
    assert first.keys() | middle.keys() | last.keys() == whole.keys()
    for stage in (first, middle, last):
        for key, tensor in stage.items():
            assert torch.equal(tensor, whole[key]), key


@pytest.mark.parametrize("flavour", FLAVOURS)
@torch.no_grad()
def test_positions_passed_in_as_computed_today_give_identical_logits(flavour):
    model = tiny_model(flavour)
    ids, mask = random_ids(2, 10), torch.ones(2, 10, dtype=torch.long)
    assert torch.equal(model(ids, positions=torch.arange(10).expand(2, 10))[0], model(ids)[0])
    mask[1, :4] = 0
    from_mask = (mask.cumsum(-1) - 1).clamp(min=0)
    assert torch.equal(model(ids, attention_mask=mask, positions=from_mask)[0], model(ids, attention_mask=mask)[0])


@pytest.mark.parametrize("flavour", FLAVOURS)
@torch.no_grad()
def test_a_chunk_at_its_global_positions_gives_that_slice_of_the_full_sequence(flavour):
    """As under context parallelism: the second chunk attends to the first (here through the KV
    cache) and must be told where it starts; positions from 0 give other logits."""
    model = tiny_model(flavour)
    ids, start = random_ids(1, 16), 6
    full = model(ids)[0]

    def second_chunk(positions):
        cache = model.new_kv_cache(1, 16)
        model(ids[:, :start], kv_cache=cache, positions=torch.arange(start)[None])
        return model(ids[:, start:], kv_cache=cache, positions=positions[None])[0]

    torch.testing.assert_close(second_chunk(torch.arange(start, 16)), full[:, start:], rtol=0, atol=1e-5)
    assert not torch.allclose(second_chunk(torch.arange(16 - start)), full[:, start:], atol=1e-3)
