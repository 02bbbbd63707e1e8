"""The llama flavour gives Hugging Face LlamaForCausalLM's logits (fp32, max abs diff <= 1e-5)."""

import pytest
import torch

from nanotrain.config import ModelConfig
from nanotrain.errors import ExportError
from nanotrain.hf.llama import check_llama_features, hf_llama_config, hf_llama_name, model_config_from_hf
from nanotrain.model.transformer import build_model

transformers = pytest.importorskip("transformers")


def llama_pair(tie_embeddings: bool):
    """A tiny GQA nanotrain llama and an HF LlamaForCausalLM holding the same weights."""
    cfg = ModelConfig(
        flavour="llama", vocab_size=128, max_position_embeddings=64, n_layers=2, n_heads=4,
        n_kv_heads=2, d_model=64, d_ff=96, rope_theta=500.0, norm_eps=1e-5,
        tie_embeddings=tie_embeddings, init_std=0.1,  # a non-default theta and eps prove they are wired
    )
    ours = build_model(cfg, seed=3).eval()
    hf_config = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
        max_position_embeddings=cfg.max_position_embeddings, tie_word_embeddings=tie_embeddings,
        attention_bias=False, mlp_bias=False, hidden_act="silu",
    )
    hf_theta = getattr(hf_config, "rope_parameters", None) or {"rope_theta": hf_config.rope_theta}
    assert hf_theta["rope_theta"] == cfg.rope_theta  # transformers 5 moved it into rope_parameters
    hf = transformers.LlamaForCausalLM._from_config(hf_config, attn_implementation="eager").eval()
    state = {hf_llama_name(name): tensor for name, tensor in ours.state_dict().items()}
    hf.load_state_dict(state, strict=True)
    if tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    return ours, hf


@pytest.mark.parametrize("tie_embeddings", [False, True])
@torch.no_grad()
def test_llama_logits_match_transformers(tie_embeddings):
    ours, hf = llama_pair(tie_embeddings)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    expected = hf(input_ids=ids).logits
    assert (ours(ids)[0] - expected).abs().max().item() <= 1e-5
    assert expected.abs().max() > 0.1, "logits too small for the comparison to mean anything"


@torch.no_grad()
def test_llama_logits_match_transformers_with_left_padding():
    ours, hf = llama_pair(tie_embeddings=False)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    # HF derives positions from the cache, not the mask, unless told; generate() passes these.
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    expected = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    logits = ours(ids, attention_mask=mask)[0]
    real = mask.bool()
    assert (logits[real] - expected[real]).abs().max().item() <= 1e-5


@torch.no_grad()
def test_the_shared_hf_config_builds_a_llama_with_our_logits():
    # hf/llama.py's mapping (what export writes as config.json and bench builds) gives the same model as the one above.
    ours, _ = llama_pair(tie_embeddings=True)
    hf = transformers.LlamaForCausalLM._from_config(hf_llama_config(ours.config), attn_implementation="eager").eval()
    hf.load_state_dict({hf_llama_name(name): tensor for name, tensor in ours.state_dict().items()}, strict=True)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    assert (ours(ids)[0] - hf(input_ids=ids).logits).abs().max().item() <= 1e-5
    assert model_config_from_hf(hf.config.to_dict()) == ours.config  # and the import reads it back


def test_only_the_llama_features_have_an_hf_counterpart():
    check_llama_features(ModelConfig(flavour="llama"))
    with pytest.raises(ExportError) as info:
        check_llama_features(ModelConfig(flavour="gpt"))
    message = str(info.value)
    assert message.startswith("the gpt flavour has no LlamaForCausalLM equivalent (")
    for difference in ("norm layernorm instead of rmsnorm", "mlp gelu instead of swiglu",
                       "positions learned instead of rope", "bias True instead of False"):
        assert difference in message
