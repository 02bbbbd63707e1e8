"""Hugging Face's Llama format: parameter names and config.json, in both directions.

The one place that knows how nanotrain's llama flavour is spelt in transformers'
`LlamaForCausalLM`: the export and import of nanotrain.export, nanotrain.bench's reference model
and the parity tests all translate through it. Only the llama flavour's features (config.py's FEATURES)
have an HF counterpart; the weights need no permutation because nanotrain's RoPE already uses
HF's rotate-halves layout.
"""

from __future__ import annotations

import re

from nanotrain.config import FEATURES, ModelConfig
from nanotrain.errors import ExportError

SILU_NAMES = ("silu", "swish")  # transformers' two names for x * sigmoid(x), the activation of SwiGLU
LLAMA_FEATURES = FEATURES["llama"]  # the architecture LlamaForCausalLM implements


# ---- parameter names ---------------------------------------------------------------------------

_HF_LLAMA_NAMES = {  # nanotrain name -> transformers name; "{}" stands for the layer index
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "blocks.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "blocks.{}.attn.q_proj.weight": "model.layers.{}.self_attn.q_proj.weight",
    "blocks.{}.attn.k_proj.weight": "model.layers.{}.self_attn.k_proj.weight",
    "blocks.{}.attn.v_proj.weight": "model.layers.{}.self_attn.v_proj.weight",
    "blocks.{}.attn.o_proj.weight": "model.layers.{}.self_attn.o_proj.weight",
    "blocks.{}.mlp_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "blocks.{}.mlp.gate_proj.weight": "model.layers.{}.mlp.gate_proj.weight",
    "blocks.{}.mlp.up_proj.weight": "model.layers.{}.mlp.up_proj.weight",
    "blocks.{}.mlp.down_proj.weight": "model.layers.{}.mlp.down_proj.weight",
    "norm.weight": "model.norm.weight",
    "lm_head.weight": "lm_head.weight",
}
_FROM_HF_LLAMA_NAMES = {hf: ours for ours, hf in _HF_LLAMA_NAMES.items()}


def _translate(name: str, table: dict[str, str], what: str) -> str:
    layer = re.search(r"\.(\d+)\.", name)
    pattern = name.replace(layer.group(0), ".{}.", 1) if layer else name
    if pattern not in table:
        raise KeyError(f"'{name}' has no counterpart in {what}")
    return table[pattern].format(layer.group(1)) if layer else table[pattern]


def hf_llama_name(name: str) -> str:
    """The LlamaForCausalLM parameter name of a llama-flavour nanotrain parameter."""
    return _translate(name, _HF_LLAMA_NAMES, "transformers' LlamaForCausalLM")


def nanotrain_name_from_hf(hf_name: str) -> str:
    """The nanotrain parameter name of a LlamaForCausalLM parameter (inverse of hf_llama_name)."""
    return _translate(hf_name, _FROM_HF_LLAMA_NAMES, "nanotrain's llama flavour")


# ---- config.json -------------------------------------------------------------------------------

def check_llama_features(model_cfg: ModelConfig) -> None:
    """Refuse a model whose flavour's features are not LlamaForCausalLM's, naming each difference."""
    ours = model_cfg.features
    differences = [f"{name} {getattr(ours, name)} instead of {wanted}"
                   for name, wanted in vars(LLAMA_FEATURES).items() if getattr(ours, name) != wanted]
    if differences:
        raise ExportError(f"the {model_cfg.flavour} flavour has no LlamaForCausalLM equivalent "
                          f"({', '.join(differences)}); only llama checkpoints export to HF")


def hf_config(model_cfg: ModelConfig, tokenizer=None) -> dict:
    """The config.json of a LlamaForCausalLM equal to a llama-flavour model.

    `rope_theta` and `rope_scaling` are the long-standing keys every transformers version reads
    (version 5 folds them into `rope_parameters` on load).
    """
    special = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer is not None:
        special = {"bos_token_id": tokenizer.bos_id if tokenizer.bos_id >= 0 else None,
                   "eos_token_id": tokenizer.eos_id,
                   "pad_token_id": tokenizer.pad_id if tokenizer.has_pad else None}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model_cfg.vocab_size,
        "hidden_size": model_cfg.d_model,
        "intermediate_size": model_cfg.d_ff,
        "num_hidden_layers": model_cfg.n_layers,
        "num_attention_heads": model_cfg.n_heads,
        "num_key_value_heads": model_cfg.kv_heads,
        "head_dim": model_cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": model_cfg.max_position_embeddings,
        "rms_norm_eps": model_cfg.norm_eps,
        "rope_theta": model_cfg.rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": model_cfg.init_std,
        "tie_word_embeddings": model_cfg.tie_embeddings,
        "torch_dtype": "float32",
        "use_cache": True,
        **special,
    }


def hf_llama_config(model_cfg: ModelConfig):
    """The transformers.LlamaConfig of a llama-flavour model: `hf_config` read as `from_pretrained` reads it.

    For nanotrain.bench and the tests; transformers is an optional dependency, so it is imported here.
    """
    from transformers import LlamaConfig

    return LlamaConfig.from_dict(hf_config(model_cfg))


def model_config_from_hf(hf: dict) -> ModelConfig:
    """The llama-flavour ModelConfig of an HF Llama config.json, refusing what it cannot express."""
    if hf.get("model_type") != "llama" and "LlamaForCausalLM" not in hf.get("architectures", []):
        raise ExportError(
            f"config.json describes model_type '{hf.get('model_type')}', architectures {hf.get('architectures')}; "
            "only Llama (LlamaForCausalLM) directories can be imported"
        )
    rope_key, rope = _rope_settings(hf)
    rope_type = rope.get("rope_type", rope.get("type", "default"))  # "type" is the transformers 4.3x spelling
    partial_rotary = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    refusals = {
        rope_key: None if rope_type == "default" else rope,
        "partial_rotary_factor": None if partial_rotary == 1 else partial_rotary,
        "attention_bias": hf.get("attention_bias", False) or None,
        "mlp_bias": hf.get("mlp_bias", False) or None,
        "hidden_act": None if hf.get("hidden_act", "silu") in SILU_NAMES else hf.get("hidden_act"),
    }
    for key, value in refusals.items():
        if value is not None:
            raise ExportError(f"config.json sets {key} = {value!r}, which nanotrain's llama flavour does not "
                              "implement (it has plain RoPE, no biases, SiLU); this model cannot be imported exactly")
    n_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
    if head_dim * n_heads != hf["hidden_size"]:
        raise ExportError(f"config.json has head_dim {head_dim} x {n_heads} heads != hidden_size {hf['hidden_size']}; "
                          "nanotrain requires head_dim = hidden_size / num_attention_heads")
    return ModelConfig(
        flavour="llama",
        vocab_size=hf["vocab_size"],
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        n_layers=hf["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads") or n_heads,
        d_model=hf["hidden_size"],
        d_ff=hf["intermediate_size"],
        rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),  # the dict wins, as in transformers
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
    )


def _rope_settings(hf: dict) -> tuple[str, dict]:
    """The config.json key that holds the RoPE settings, and its dict, read as transformers 5 reads them.

    transformers 4 writes `rope_theta` beside `rope_scaling` (null for plain RoPE); transformers 5
    writes `rope_parameters` = {"rope_type": ..., "rope_theta": ...}, and on load a non-empty
    `rope_scaling` replaces it.
    """
    key = "rope_scaling" if hf.get("rope_scaling") else "rope_parameters"
    rope = hf.get(key) or {}
    if not isinstance(rope, dict):
        raise ExportError(f"config.json sets {key} = {rope!r}; expected an object such as "
                          '{"rope_type": "default", "rope_theta": 10000.0}')
    return key, rope

