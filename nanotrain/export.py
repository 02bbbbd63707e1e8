"""Export to, and import from, Hugging Face's Llama format.

    python -m nanotrain.export --checkpoint CKPT --format hf --out DIR         # nanotrain -> HF
    python -m nanotrain.export --hf DIR --format nanotrain --out CKPT         # HF -> nanotrain

Export writes what `transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads as
`LlamaForCausalLM`: config.json, model.safetensors (HF parameter names, fp32), the tokenizer
(tokenizer.json, which `AutoTokenizer` loads and which encodes and decodes as nanotrain does:
translated from a sentencepiece model, kept beside it as tokenizer.model; or the checkpoint's own
tokenizer.json) and generation_config.json.
Parameter names and config.json come from hf/llama.py (`hf_llama_name` / `nanotrain_name_from_hf`,
`hf_config` / `model_config_from_hf`), the one mapping shared with the benchmark and the parity
tests; the weights need no permutation because nanotrain's RoPE already uses HF's rotate-halves
layout. Only the llama flavour has an HF counterpart.

Import reads such a directory (made by nanotrain or by anyone else: Llama 2, TinyLlama, ...),
refuses what the llama flavour cannot express (rope scaling, biases, other activations), and
writes a nanotrain checkpoint directory that `nanotrain.generate` and `nanotrain.evaluate`
read and that training starts from with `--train.init_from=CKPT`.

Both directions write into a temporary directory renamed into place when complete, so an
interrupted run never leaves an output that looks usable.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from nanotrain.checkpoint.manifest import tokenizer_file, write_safetensors
from nanotrain.config import Config, validate
from nanotrain.errors import ArgumentParser, ConfigError, ExportError, TokenizerError, exit_on_error
from nanotrain.files import atomic_directory
from nanotrain.hf.llama import (
    check_llama_features,
    hf_config,
    hf_llama_name,
    model_config_from_hf,
    nanotrain_name_from_hf,
)
from nanotrain.model.transformer import build_model


# ---- nanotrain -> Hugging Face -----------------------------------------------------------------

def tokenizer_files(tokenizer, max_len: int) -> dict[str, dict | bytes]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json for a nanotrain tokenizer.

    The config names `PreTrainedTokenizerFast`, so transformers loads tokenizer.json as written.
    (`LlamaTokenizer` would keep only its vocabulary and merges and put its own Metaspace
    pre-tokenizer in front, which encodes text that starts with a space differently.)
    `split_special_tokens`: text that spells "<s>" is encoded as text, as nanotrain does.
    """
    from nanotrain.data.tokenizer import HuggingFaceTokenizer

    special = {"bos_token": tokenizer.token(tokenizer.bos_id), "eos_token": tokenizer.token(tokenizer.eos_id),
               "unk_token": tokenizer.token(tokenizer.unk_id),
               "pad_token": tokenizer.token(tokenizer.pad_id) if tokenizer.has_pad else None}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": tokenizer.bos_id >= 0,  # nanotrain's documents and prompts start with BOS
        "add_eos_token": False,
        "model_max_length": max_len,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        **special,
    }
    as_json = _starting_with_bos if isinstance(tokenizer, HuggingFaceTokenizer) else hf_tokenizer_json
    return {"tokenizer.json": as_json(tokenizer),
            "tokenizer_config.json": config,
            "special_tokens_map.json": {k: v for k, v in special.items() if v is not None}}


def hf_tokenizer_json(tokenizer) -> dict:
    """A Hugging Face `tokenizers` description that encodes and decodes exactly as the sentencepiece model.

    Written the way Llama 2's tokenizer.json is: no pre-tokenizer, so the whole text is one word
    for BPE, as in sentencepiece; a normalizer that adds the dummy-prefix "▁" (always, also before
    a leading space) and turns spaces into "▁"; the BPE merges of every vocabulary piece, ranked by
    its score as sentencepiece ranks them; byte fallback; a decoder that undoes the normalizer.
    Settings this cannot reproduce exactly are refused (see `_check_exportable`).
    """
    spec = tokenizer.spec
    _check_exportable(spec)
    vocab = {piece: token_id for token_id, (piece, _, _) in enumerate(spec.pieces)}
    special = [{"id": token_id, "content": piece, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": True}
               for token_id, (piece, _, kind) in enumerate(spec.pieces) if kind in ("control", "unknown")]
    normalizers = [{"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]
    decoders = [{"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if spec.add_dummy_prefix:  # sentencepiece adds "▁" to any non-empty text and drops it when decoding
        normalizers.insert(0, {"type": "Prepend", "prepend": "▁"})
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    post_processor = None
    if tokenizer.bos_id >= 0:
        bos = spec.pieces[tokenizer.bos_id][0]
        post_processor = _bos_first(bos, tokenizer.bos_id)
    unk = spec.pieces[tokenizer.unk_id][0] if tokenizer.unk_id >= 0 else None
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": special,
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": post_processor,
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": unk, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": True,
                  "ignore_merges": False, "vocab": vocab, "merges": _bpe_merges(spec.pieces)},
    }


def _bos_first(bos: str, bos_id: int) -> dict:
    """A tokenizer.json post-processor that puts BOS before each text, as nanotrain's prompts start."""
    return {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }


def _starting_with_bos(tokenizer) -> dict | bytes:
    """A Hugging Face tokenizer's own tokenizer.json, its bytes unchanged when its post-processor already
    starts every text with BOS as nanotrain does (Llama 3's); otherwise with one that does (GPT-2's adds
    nothing), after the original when that is ByteLevel (it only adjusts offsets)."""
    probe = "Once upon a time"
    if tokenizer.backend.encode(probe).ids == tokenizer.encode(probe, bos=True):
        return tokenizer.file_bytes
    description = json.loads(tokenizer.file_bytes)
    bos = tokenizer.token(tokenizer.bos_id)
    template = _bos_first(bos, tokenizer.bos_id)
    kept = description.get("post_processor")
    byte_level = isinstance(kept, dict) and kept.get("type") == "ByteLevel"
    description["post_processor"] = {"type": "Sequence", "processors": [kept, template]} if byte_level else template
    return description


def _bpe_merges(pieces) -> list[list[str]]:
    """Every (left, right) pair of vocabulary pieces that concatenates to a vocabulary piece, best first.

    sentencepiece's BPE merges, at each step, the adjacent pair whose concatenation is the piece of
    highest score; listing the pairs by that score (ties by piece id, then by the ids of the two
    halves) gives `tokenizers` the same order. Only normal pieces take part: sentencepiece never
    forms control or byte pieces from text.
    """
    normal = {piece: token_id for token_id, (piece, _, kind) in enumerate(pieces) if kind == "normal"}
    ranked = []
    for piece, token_id in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((-pieces[token_id][1], token_id, normal[left], normal[right], left, right))
    return [[left, right] for *_, left, right in sorted(ranked)]


def _check_exportable(spec) -> None:
    """Refuse a sentencepiece model whose behaviour tokenizer.json cannot reproduce exactly."""
    unsupported = [
        (spec.model_type != "bpe", f"the {spec.model_type} model type (only BPE is translated)"),
        (not spec.byte_fallback, "no byte fallback (sentencepiece decodes <unk> as ' ⁇ ', transformers drops it)"),
        (spec.normalization_rules, "normalization rules (e.g. NFKC)"),
        (spec.denormalization_rules, "denormalization rules"),
        (spec.remove_extra_whitespaces, "remove_extra_whitespaces"),
        (not spec.escape_whitespaces, "unescaped whitespace (escape_whitespaces = false)"),
        (spec.whitespace_as_suffix, "treat_whitespace_as_suffix"),
        (any(kind == "user_defined" for *_, kind in spec.pieces), "user-defined pieces"),
        (any(kind == "unused" for *_, kind in spec.pieces), "unused pieces"),
    ]
    found = [what for applies, what in unsupported if applies]
    if found:
        raise ExportError(
            f"the checkpoint's tokenizer.model uses {', '.join(found)}, which a Hugging Face tokenizer.json cannot "
            "reproduce exactly; only byte-fallback BPE models without these settings export "
            "(nanotrain's own and Llama 2's)"
        )


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
    from nanotrain.checkpoint.inference import load_inference
    from nanotrain.data.tokenizer import SentencePieceTokenizer

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


# ---- Hugging Face -> nanotrain -----------------------------------------------------------------

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
    from nanotrain.checkpoint.inference import save_inference
    from nanotrain.data.tokenizer import Tokenizer

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


# ---- shared helpers ----------------------------------------------------------------------------

def _check_out(out: str | Path) -> Path:
    out = Path(out)
    if out.exists():
        raise ExportError(f"output '{out}' already exists; choose a new --out or delete it first")
    return out


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m nanotrain.export",
        description="Convert between nanotrain checkpoints and Hugging Face Llama directories.",
        epilog="export: --checkpoint CKPT --format hf --out DIR;  import: --hf DIR --format nanotrain --out CKPT",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="nanotrain checkpoint directory to export")
    source.add_argument("--hf", help="Hugging Face Llama directory (config.json, *.safetensors) to import")
    parser.add_argument("--format", choices=("hf", "nanotrain"),
                        help="format to write (default: the other one: hf for --checkpoint, nanotrain for --hf)")
    parser.add_argument("--out", required=True, help="output directory (must not exist yet)")
    return parser


@exit_on_error
def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    wanted = args.format or ("hf" if args.checkpoint else "nanotrain")
    if args.checkpoint and wanted == "hf":
        from nanotrain.checkpoint.inference import find_checkpoint

        print(f"wrote Hugging Face LlamaForCausalLM directory {export_hf(find_checkpoint(args.checkpoint), args.out)}")
    elif args.hf and wanted == "nanotrain":
        print(f"wrote nanotrain checkpoint {import_hf(args.hf, args.out)}")
    else:
        given = "--checkpoint (a nanotrain checkpoint)" if args.checkpoint else "--hf (an HF directory)"
        raise ExportError(f"{given} cannot be written as --format {wanted}: it already is that format")


if __name__ == "__main__":
    main()
