"""Conversion between nanotrain checkpoints and Hugging Face Llama directories, both ways (docs/10).

`export_hf` writes what `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads as
`LlamaForCausalLM`: config.json, model.safetensors (HF parameter names, fp32), the tokenizer files
(hf/tokenizer_json.py; a sentencepiece model also kept beside them as tokenizer.model) and
generation_config.json. Names and config.json come from hf/llama.py; the weights need no
permutation because nanotrain's RoPE already uses HF's rotate-halves layout. Only the llama flavour
has an HF counterpart.

`import_hf` reads such a directory (nanotrain's or anyone's: Llama 2, TinyLlama, ...), refuses what
the llama flavour cannot express (rope scaling, biases, other activations) and writes a nanotrain
checkpoint directory that generate and evaluate read and that training starts from with
`--train.init_from=CKPT`.

`hf_llama_with_weights_of` builds in memory the `LlamaForCausalLM` that holds a model's weights:
nanotrain.bench's reference.

Export and import write into a temporary directory renamed into place when complete, so an
interrupted run never leaves an output that looks usable; bad input raises `ExportError` before
anything is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from nanotrain.checkpoint.inference import load_inference, save_inference
from nanotrain.checkpoint.manifest import tokenizer_file, write_safetensors
from nanotrain.config import Config, ModelConfig, validate
from nanotrain.data.tokenizer import SentencePieceTokenizer, Tokenizer
from nanotrain.errors import ConfigError, ExportError, NanotrainError, TokenizerError
from nanotrain.files import atomic_directory
from nanotrain.hf.llama import (
    check_llama_features,
    hf_config,
    hf_llama_config,
    hf_llama_name,
    model_config_from_hf,
    nanotrain_name_from_hf,
)
from nanotrain.hf.tokenizer_json import tokenizer_files
from nanotrain.model.transformer import build_model


def hf_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's weights under LlamaForCausalLM names; a tied head is stored once, as HF does."""
    state = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            continue  # HF re-ties lm_head to embed_tokens on load
        state[hf_llama_name(name)] = tensor.detach().to("cpu", torch.float32).contiguous()
    return state


def export_hf(checkpoint: str | Path, out: str | Path) -> Path:
    """Write checkpoint `checkpoint` as a Hugging Face LlamaForCausalLM directory `out`."""
    out = _check_out(out)
    model, cfg, tokenizer = load_inference(checkpoint, device="cpu")
    check_llama_features(cfg.model)

    # Built first: a tokenizer that cannot be translated is refused before anything is written.
    tokenizer_jsons = tokenizer_files(tokenizer, cfg.model.max_position_embeddings) if tokenizer is not None else {}
    with atomic_directory(out, hidden=True) as temp:
        write_safetensors(temp / "model.safetensors", hf_state_dict(model), metadata={"format": "pt"})
        _write_json(temp / "config.json", hf_config(cfg.model, tokenizer))
        generation = {"_from_model_config": False}
        generation.update({k: v for k, v in hf_config(cfg.model, tokenizer).items() if k.endswith("_token_id")})
        _write_json(temp / "generation_config.json", generation)
        if isinstance(tokenizer, SentencePieceTokenizer):
            tokenizer.save(temp / tokenizer.file_name)  # for sentencepiece users and the import back
        for name, content in tokenizer_jsons.items():
            if isinstance(content, bytes):
                (temp / name).write_bytes(content)
            else:
                _write_json(temp / name, content)
    return out


def hf_llama_with_weights_of(model: torch.nn.Module, cfg: ModelConfig):
    """transformers' LlamaForCausalLM with the same configuration and weights as `model`."""
    try:
        import transformers
    except ImportError:
        raise NanotrainError(
            "the llama benchmark compares with Hugging Face transformers: pip install transformers"
        ) from None
    hf = transformers.LlamaForCausalLM(hf_llama_config(cfg))  # attention through SDPA, transformers' default
    hf.load_state_dict({hf_llama_name(k): v for k, v in model.state_dict().items()}, strict=True)
    return hf


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of the directory's *.safetensors files (one file or shards), as fp32."""
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        pickled = [p.name for p in directory.glob("*.bin")]
        hint = (f" (found {', '.join(pickled)}: pickled weights are not loaded; convert them to safetensors "
                "with transformers' save_pretrained(..., safe_serialization=True))") if pickled else ""
        raise ExportError(f"'{directory}' holds no *.safetensors weights{hint}")
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key).to(torch.float32)
    return tensors


def import_hf(hf_dir: str | Path, out: str | Path) -> Path:
    """Write the HF Llama directory `hf_dir` as a nanotrain checkpoint directory `out`."""
    hf_dir = Path(hf_dir)
    if not (hf_dir / "config.json").is_file():
        raise ExportError(f"'{hf_dir}' has no config.json; pass a Hugging Face model directory with --hf")
    out = _check_out(out)
    try:
        hf = json.loads((hf_dir / "config.json").read_text())
        model_cfg = model_config_from_hf(hf)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ExportError(f"'{hf_dir / 'config.json'}' is not a readable Llama config ({e!r})") from None

    # tokenizer.model first: beside a translated tokenizer.json (nanotrain's export, Llama 2) it is the original
    tokenizer_path = tokenizer_file(hf_dir)
    tokenizer = None
    if tokenizer_path is not None:
        try:
            tokenizer = Tokenizer.load(tokenizer_path)
        except TokenizerError as e:
            raise ExportError(str(e)) from None
        if tokenizer.vocab_size > model_cfg.vocab_size:
            raise ExportError(f"{tokenizer_path.name} has {tokenizer.vocab_size} tokens but the model's vocab_size is "
                              f"{model_cfg.vocab_size}; they do not belong together")

    cfg = Config(model=model_cfg)
    cfg.train.seq_len = min(cfg.train.seq_len, model_cfg.max_position_embeddings)
    if tokenizer is None:
        cfg.data.source = "random"  # the layout's convention: no tokenizer <=> random tokens
    cfg.data.stories_vocab_size = min(cfg.data.stories_vocab_size, model_cfg.vocab_size)
    try:
        validate(cfg)
    except ConfigError as e:
        raise ExportError(f"the imported model does not form a valid nanotrain config: {e}") from None

    model = build_model(model_cfg)
    state = {}
    for hf_name, tensor in read_hf_weights(hf_dir).items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # a buffer some old checkpoints saved; nanotrain computes it from rope_theta
        try:
            state[nanotrain_name_from_hf(hf_name)] = tensor
        except KeyError as e:
            raise ExportError(f"weights: {e.args[0]}; is this a plain LlamaForCausalLM?") from None
    if model_cfg.tie_embeddings:
        state.pop("lm_head.weight", None)  # the tied head is the embedding table
        state["lm_head.weight"] = state.get("tok_embeddings.weight")
    expected = model.state_dict()
    missing = sorted(k for k in expected if state.get(k) is None)
    if missing:
        raise ExportError(f"the safetensors files lack {len(missing)} weights of this config, e.g. "
                          f"'{hf_llama_name(missing[0])}'")
    for name, tensor in state.items():
        if tensor.shape != expected[name].shape:
            raise ExportError(f"weight '{hf_llama_name(name)}' has shape {tuple(tensor.shape)}, config.json "
                              f"implies {tuple(expected[name].shape)}")
    model.load_state_dict(state, strict=True)
    return save_inference(out, model.state_dict(), cfg, tokenizer_path)


def _check_out(out: str | Path) -> Path:
    out = Path(out)
    if out.exists():
        raise ExportError(f"output '{out}' already exists; choose a new --out or delete it first")
    return out


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")
