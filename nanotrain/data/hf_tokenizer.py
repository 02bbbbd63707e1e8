"""Hugging Face `tokenizer.json` files, read with the `tokenizers` library: GPT-2's byte-level BPE, Llama 3's, ...

The file is JSON (loading runs nothing from it) and is kept byte for byte: datasets and
checkpoints store it as tokenizer.json, and its sha256 identifies it.

Special ids come from the file itself. A TemplateProcessing post-processor names BOS (a special
token before the text) and EOS (one after it); otherwise the special added tokens are looked up by
the usual names (BOS_NAMES, EOS_NAMES, PAD_NAMES). GPT-2 has only `<|endoftext|>`, which then
serves as both BOS and EOS: it separates documents, so it also starts one.

nanotrain adds BOS and EOS itself (the dataset's layout is BOS text EOS), so text is encoded
without the post-processor; text that spells a special token ("<|endoftext|>") is encoded as text,
as sentencepiece treats "<s>", so no document can forge a document boundary.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from nanotrain.data.tokenizer import Tokenizer, TokenizerError, first_line

BOS_NAMES = ("<|begin_of_text|>", "<s>", "<|startoftext|>", "<bos>", "[BOS]")
EOS_NAMES = ("<|end_of_text|>", "</s>", "<|endoftext|>", "<eos>", "[EOS]")
PAD_NAMES = ("<pad>", "<|pad|>", "[PAD]")


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json`, loaded unchanged."""

    file_name = "tokenizer.json"

    def __init__(self, file_bytes: bytes, path: Path | None = None):
        try:
            import tokenizers
        except ImportError:
            raise TokenizerError("a Hugging Face tokenizer.json needs the tokenizers package: "
                                 "pip install 'nanotrain[tokenizers]'") from None
        where = f"'{path}'" if path else "the tokenizer.json"
        try:
            text = file_bytes.decode("utf-8")
            description = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise TokenizerError(f"{where} is not valid JSON ({first_line(e)}); pass an intact Hugging Face "
                                 "tokenizer.json or a sentencepiece .model") from None
        if not isinstance(description, dict) or not isinstance(description.get("model"), dict):
            raise TokenizerError(f"{where} is JSON but not a Hugging Face tokenizer.json (it has no 'model' object)")
        try:
            self.backend = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # the library raises a bare Exception for any description it cannot build
            raise TokenizerError(f"{where} is not a tokenizer.json the tokenizers library can read "
                                 f"({first_line(e)})") from None
        self.backend.encode_special_tokens = True  # "<|endoftext|>" in a document is text, not a boundary
        vocab = self.backend.get_vocab(with_added_tokens=True)
        special = {token["content"]: token["id"] for token in description.get("added_tokens") or []
                   if isinstance(token, dict) and token.get("special")}

        def named(names: tuple[str, ...]) -> int:
            return next((special[name] for name in names if name in special), -1)

        before, after = _template_ids(description.get("post_processor"))
        eos = after if after >= 0 else named(EOS_NAMES)
        if eos < 0:
            raise TokenizerError(f"{where} has no end-of-text token: its post-processor appends none and no special "
                                 f"added token is named {', '.join(EOS_NAMES)}; documents need one")
        bos = before if before >= 0 else named(BOS_NAMES)
        unk_token = description["model"].get("unk_token")
        self._set_ids(file_bytes, path, max(vocab.values()) + 1, bos if bos >= 0 else eos, eos,
                      vocab.get(unk_token, -1) if isinstance(unk_token, str) else -1, named(PAD_NAMES))

    def token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id) if token_id >= 0 else None

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def encode_batch(self, texts: list[str], bos: bool = False, eos: bool = False, num_threads: int = -1) -> list[list[int]]:
        """Encode many texts at once: on one thread when `num_threads` is 1, else on the tokenizers
        library's own thread pool (all cores, or RAYON_NUM_THREADS; its size is fixed at first use)."""
        if num_threads == 1:
            encoded = [self.backend.encode(text, add_special_tokens=False).ids for text in texts]
        else:
            encoded = [e.ids for e in self.backend.encode_batch_fast(list(texts), add_special_tokens=False)]
        head, tail = [self.bos_id] if bos else [], [self.eos_id] if eos else []
        return [head + ids + tail for ids in encoded]

    def decode(self, ids: Iterable[int]) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=True)


def _template_ids(post_processor) -> tuple[int, int]:
    """(id before the text, id after it) in a TemplateProcessing's single-text template, -1 where none."""
    if not isinstance(post_processor, dict):
        return -1, -1
    if post_processor.get("type") == "Sequence":
        found = [_template_ids(p) for p in post_processor.get("processors") or []]
        return (next((b for b, _ in found if b >= 0), -1), next((a for _, a in found if a >= 0), -1))
    if post_processor.get("type") != "TemplateProcessing":
        return -1, -1
    single, tokens = post_processor.get("single") or [], post_processor.get("special_tokens") or {}
    text_at = next((i for i, piece in enumerate(single) if "Sequence" in piece), None)
    if text_at is None:
        return -1, -1

    def first_id(names: list[str]) -> int:
        ids = (tokens.get(names[0]) or {}).get("ids") if names else None
        return ids[0] if ids else -1

    special = [piece["SpecialToken"]["id"] if "SpecialToken" in piece else None for piece in single]
    before = [name for name in special[:text_at] if name is not None]
    after = [name for name in special[text_at + 1 :] if name is not None]
    return first_id(before[-1:]), first_id(after)
