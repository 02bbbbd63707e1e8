"""Hugging Face tokenizer.json tokenizers (GPT-2 and Llama 3 styles, built here): prepare, train, generate, export."""

import json

import numpy as np
import pytest

from nanotrain.checkpoint.inference import load_inference
from nanotrain.config import load_config
from nanotrain.data.dataset_format import dataset_vocab_size
from nanotrain.data.sources import TokensSource
from nanotrain.data.stories import generate_stories
from nanotrain.data.tokenizer import HuggingFaceTokenizer, Tokenizer
from nanotrain.errors import TokenizerError
from nanotrain.hf.convert import export_hf, import_hf
from nanotrain.prepare import main as prepare_main
from nanotrain.prepare import prepare
from nanotrain.training.trainer import train
from test_export import HARD_STRINGS

tokenizers = pytest.importorskip("tokenizers")

# Llama 3's pre-tokenizer split: contractions, letter runs, up to 3 digits, punctuation, newlines, spaces.
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
STYLES = ("gpt2", "llama3")


def build_tokenizer_json(style: str, texts: list[str]) -> str:
    """A byte-level BPE tokenizer.json trained on `texts`, laid out as GPT-2's or Llama 3's."""
    from tokenizers import Regex, decoders, models, pre_tokenizers, processors

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=style == "gpt2")
    tok = tokenizers.Tokenizer(models.BPE(ignore_merges=style == "llama3"))
    tok.pre_tokenizer = byte_level if style == "gpt2" else pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False), byte_level])
    tok.decoder = decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                             special_tokens=["<|endoftext|>"] if style == "gpt2" else [],
                                             show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if style == "gpt2":
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    else:  # as Llama 3: special tokens after the merges' vocabulary, BOS added by a template
        tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>"])
        bos = tok.token_to_id("<|begin_of_text|>")
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                          pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                          special_tokens=[("<|begin_of_text|>", bos)]),
        ])
    return tok.to_str()


@pytest.fixture(scope="module")
def stories():
    return generate_stories(120, seed=5)


@pytest.fixture(scope="module", params=STYLES)
def style_tokenizer(request, stories, tmp_path_factory):
    """(style, path of its tokenizer.json)"""
    path = tmp_path_factory.mktemp(request.param) / "tokenizer.json"
    path.write_text(build_tokenizer_json(request.param, stories))
    return request.param, path


@pytest.fixture(scope="module")
def prepared(style_tokenizer, stories, tmp_path_factory):
    """(style, tokenizer.json, dataset dir, meta) of the stories, plus one that spells the special tokens."""
    style, path = style_tokenizer
    directory = tmp_path_factory.mktemp(f"{style}-data")
    documents = stories + ["A story that spells <|endoftext|> and <|begin_of_text|> and <|end_of_text|>."]
    (directory / "stories.txt").write_text("\n<|endoftext|>\n".join(documents))
    meta = prepare([str(directory / "stories.txt")], directory / "data", tokenizer=str(path), val_fraction=0.1,
                   verbose=False)
    return style, path, directory / "data", meta, documents


def read_documents(out, meta) -> list[list[int]]:
    tokens = {split: np.fromfile(out / f"{split}.bin", dtype=meta["dtype"]) for split in ("train", "val")}
    offsets = {split: np.fromfile(out / f"{split}.idx", dtype=np.uint64) for split in ("train", "val")}
    return [tokens[s][a:b].tolist() for s in ("train", "val") for a, b in zip(offsets[s][:-1], offsets[s][1:])]


def test_special_ids_come_from_the_file(style_tokenizer):
    style, path = style_tokenizer
    tok = Tokenizer.load(path)
    reference = tokenizers.Tokenizer.from_file(str(path))
    assert isinstance(tok, HuggingFaceTokenizer) and tok.file_name == "tokenizer.json"
    assert tok.file_bytes == path.read_bytes() and tok.vocab_size == reference.get_vocab_size(with_added_tokens=True)
    if style == "gpt2":  # only <|endoftext|>: it ends documents and starts them
        assert tok.bos_id == tok.eos_id == reference.token_to_id("<|endoftext|>") == 0
    else:
        assert (tok.bos_id, tok.eos_id) == (reference.token_to_id("<|begin_of_text|>"),
                                            reference.token_to_id("<|end_of_text|>")) == (400, 401)
    assert not tok.has_pad and tok.pad_id == tok.eos_id
    text = "Once upon a time, 東京 🐉\n\n  spaces"
    expected = [tok.bos_id] + reference.encode(text, add_special_tokens=False).ids + [tok.eos_id]
    assert tok.encode(text, bos=True, eos=True) == expected
    assert tok.decode(tok.encode(text, bos=True, eos=True)) == text


def test_prepared_ids_are_the_tokenizers_librarys_own(prepared):
    style, path, out, meta, documents = prepared
    reference = tokenizers.Tokenizer.from_file(str(path))
    reference.encode_special_tokens = True  # a document's text never becomes a special token
    bos, eos = meta["bos_id"], meta["eos_id"]
    head = [] if style == "gpt2" else [bos]  # GPT-2's <|endoftext|> is BOS and EOS: stored once, after the text
    expected = sorted(head + reference.encode(doc, add_special_tokens=False).ids + [eos] for doc in documents)
    stored = read_documents(out, meta)
    assert sorted(stored) == expected
    assert meta["tokenizer"]["file"] == "tokenizer.json" and (out / "tokenizer.json").read_bytes() == path.read_bytes()
    assert meta["vocab_size"] == Tokenizer.load(path).vocab_size and meta["dtype"] == "uint16"
    tok = Tokenizer.load(path)
    spelled = next(ids for ids in stored if "spells" in tok.decode(ids))
    assert tok.decode(spelled) == documents[-1]
    assert sum(i in (bos, eos) for i in spelled) == len(head) + 1  # its own BOS and EOS only: the spelled ones are text


def test_one_separator_between_documents_when_bos_is_eos(prepared):
    style, path, out, meta, documents = prepared
    stream = np.fromfile(out / "train.bin", dtype=meta["dtype"]).tolist()
    bos, eos = meta["bos_id"], meta["eos_id"]
    doubled = sum(a == b == eos for a, b in zip(stream, stream[1:]))
    if style == "gpt2":  # A <|endoftext|> B <|endoftext|>, as GPT-2 itself was trained: never two in a row
        assert meta["document_layout"] == "text EOS" and doubled == 0 and stream[0] != eos and stream[-1] == eos
        assert stream.count(eos) == meta["splits"]["train"]["documents"]
    else:
        assert meta["document_layout"] == "BOS text EOS" and stream[0] == bos and stream[-1] == eos
    # padded rows start with BOS in either layout, as a prompt does
    offsets = np.fromfile(out / "train.idx", dtype=np.uint64)
    first = stream[: int(offsets[1])]
    row = TokensSource(out).samples("train", 512, padded=True)[0]
    assert row["input_ids"][row["attention_mask"] == 1].tolist() == ([bos] + first if style == "gpt2" else first)[:512]


@pytest.fixture(scope="module")
def checkpoint(prepared, tmp_path_factory):
    style, path, data, meta, _ = prepared
    out = tmp_path_factory.mktemp(f"{style}-run")
    cfg = load_config(None, [
        f"--data.path={data}", "--model.n_layers=1", "--model.d_model=32", "--model.n_heads=2", "--model.n_kv_heads=1",
        "--model.d_ff=64", "--model.max_position_embeddings=64", "--train.seq_len=32", "--train.batch_size=4",
        "--train.max_steps=4", "--train.eval_every=4", "--train.log_every=2", "--train.sample_tokens=8",
        "--checkpoint.interval=4", "--checkpoint.on_preempt=false", f"--train.out_dir={out}"], dataset_vocab_size)
    train(cfg)
    return out / "checkpoints" / "step_00000004"


def test_training_saves_the_tokenizer_json_and_samples_decode(checkpoint, prepared):
    style, path, *_ = prepared
    records = [json.loads(line) for line in (checkpoint.parents[1] / "metrics.jsonl").read_text().splitlines()]
    samples = [text for record in records for text in record.get("samples", [])]
    assert samples and all(text.startswith("Once upon a time") and "Ġ" not in text for text in samples)
    assert (checkpoint / "tokenizer.json").read_bytes() == path.read_bytes()
    assert not (checkpoint / "tokenizer.model").exists()
    _, _, tokenizer = load_inference(checkpoint)
    assert isinstance(tokenizer, HuggingFaceTokenizer) and tokenizer.sha256 == Tokenizer.load(path).sha256


def test_generate_decodes_with_the_tokenizer_json(checkpoint, capsys):
    from nanotrain.generate import main

    main(["--checkpoint", str(checkpoint), "--prompt", "Once upon a time", "--max_new_tokens", "6",
          "--temperature", "0"])
    printed = capsys.readouterr().out
    assert printed.startswith("Once upon a time") and "Ġ" not in printed  # byte-level pieces decoded to text


def test_export_gives_the_same_ids_in_transformers_and_imports_back(checkpoint, prepared, tmp_path):
    transformers = pytest.importorskip("transformers")
    style, path, *_ = prepared
    ours = Tokenizer.load(path)
    hf_dir = export_hf(checkpoint, tmp_path / "hf")
    assert not (hf_dir / "tokenizer.model").exists()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    texts = HARD_STRINGS + ["<|endoftext|> spelled", "<|begin_of_text|><|end_of_text|>", "  \n\t\n  \r\n", "😀" * 5]
    mismatches = [(text, hf_tokenizer(text)["input_ids"]) for text in texts
                  if hf_tokenizer(text)["input_ids"] != ours.encode(text, bos=True)]
    assert mismatches == []
    for text in texts:
        assert hf_tokenizer.decode(ours.encode(text, bos=True, eos=True), skip_special_tokens=True) == text
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id) == (ours.bos_id, ours.eos_id)
    config = json.loads((hf_dir / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (ours.bos_id, ours.eos_id, None)
    # Llama 3's template already starts texts with BOS: its file is exported byte for byte
    assert ((hf_dir / "tokenizer.json").read_bytes() == path.read_bytes()) == (style == "llama3")

    back = import_hf(hf_dir, tmp_path / "back")
    _, _, imported = load_inference(back)
    assert isinstance(imported, HuggingFaceTokenizer) and imported.encode(texts[-1]) == ours.encode(texts[-1])


@pytest.mark.parametrize("content, phrase", [
    (b"{\"model\": {\"type\": \"BPE\", ", "is not valid JSON"),
    (b"[1, 2, 3]", "not a Hugging Face tokenizer.json"),
    (b"{\"version\": \"1.0\", \"model\": {\"type\": \"NoSuchModel\"}}", "the tokenizers library can read"),
    (b"\x00\x01 binary junk", "neither a sentencepiece .model nor a Hugging Face tokenizer.json"),
    (None, "has no end-of-text token"),
    (b"", "is empty, not a tokenizer"),  # sentencepiece took it for a model without pieces, logging 3 lines
    (b" \n", "is empty, not a tokenizer"),
])
def test_a_bad_tokenizer_file_is_one_error_line(content, phrase, stories, tmp_path, capfd):
    bad = tmp_path / "tokenizer.json"
    if content is None:  # a real tokenizer.json whose special tokens nanotrain cannot name
        description = json.loads(build_tokenizer_json("gpt2", stories[:20]))
        description["added_tokens"][0]["content"] = "<|separator|>"
        content = json.dumps(description).encode()
    bad.write_bytes(content)
    (tmp_path / "in.txt").write_text("Some text.")
    with pytest.raises(TokenizerError, match=phrase.replace(".", r"\.")):
        Tokenizer.load(bad)
    with pytest.raises(SystemExit) as exit_info:
        prepare_main([str(tmp_path / "in.txt"), "--out", str(tmp_path / "ds"), "--tokenizer", str(bad), "--quiet"])
    assert exit_info.value.code == 2
    err = capfd.readouterr().err  # at the file descriptor: a C++ library's log lines show there too
    assert err.startswith("error: ") and err.count("\n") == 1 and phrase in err, err
    assert not (tmp_path / "ds").exists()
