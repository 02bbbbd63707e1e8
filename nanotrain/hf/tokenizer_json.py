"""tokenizer.json for Hugging Face: a nanotrain tokenizer written as `transformers` loads it (docs/10).

`tokenizer_files` gives the three tokenizer files of an export. A sentencepiece model is translated
into a `tokenizers` description that encodes and decodes exactly as it does, and refused in one line
(`ExportError`) when it uses a setting the translation cannot reproduce; a Hugging Face tokenizer
keeps its own tokenizer.json, with BOS put first where it was not.
"""

from __future__ import annotations

import json

from nanotrain.data.tokenizer import HuggingFaceTokenizer
from nanotrain.errors import ExportError


def tokenizer_files(tokenizer, max_len: int) -> dict[str, dict | bytes]:
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json for a nanotrain tokenizer.

    The config names `PreTrainedTokenizerFast`, so transformers loads tokenizer.json as written.
    (`LlamaTokenizer` would keep only its vocabulary and merges and put its own Metaspace
    pre-tokenizer in front, which encodes text that starts with a space differently.)
    `split_special_tokens`: text that spells "<s>" is encoded as text, as nanotrain does.
    """
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
