"""Export to Hugging Face (logits parity in transformers) and import back (identical weights)."""

import json
import random
from pathlib import Path

import pytest
import torch

from nanotrain.checkpoint.inference import load_inference, save_inference
from nanotrain.config import load_config
from nanotrain.errors import CheckpointError, ExportError
from nanotrain.export import main
from nanotrain.hf.convert import export_hf, import_hf
from nanotrain.model.transformer import build_model

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_checkpoint(directory, tokenizer_path=None, flavour="llama", tie=False):
    overrides = [f"--model.flavour={flavour}", "--model.vocab_size=320", "--model.max_position_embeddings=64",
                 "--model.n_layers=2", "--model.n_heads=4", "--model.d_model=32", "--model.d_ff=48",
                 f"--model.tie_embeddings={tie}", "--model.init_std=0.2", "--model.rope_theta=500",
                 "--model.norm_eps=1e-5", "--data.stories_vocab_size=320", "--train.seq_len=64"]
    overrides.append("--model.n_kv_heads=2" if flavour == "llama" else "--model.n_kv_heads=0")  # GQA for llama
    cfg = load_config(None, overrides)
    model = build_model(cfg.model, seed=11)
    return save_inference(directory, model.state_dict(), cfg, tokenizer_path), model


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    from nanotrain.data.stories import generate_stories
    from nanotrain.data.tokenizer import Tokenizer

    return Tokenizer.train(generate_stories(200), 320).save(tmp_path_factory.mktemp("tok") / "tokenizer.model")


@pytest.mark.parametrize("tie", [False, True])
@torch.no_grad()
def test_export_loads_in_transformers_with_equal_logits(tmp_path, tokenizer_path, tie):
    transformers = pytest.importorskip("transformers")
    ckpt, model = make_checkpoint(tmp_path / "ckpt", tokenizer_path, tie=tie)
    out = export_hf(ckpt, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert type(hf).__name__ == "LlamaForCausalLM"
    assert hf.config.num_key_value_heads == 2 and hf.config.tie_word_embeddings == tie
    assert hf.dtype == torch.float32
    ids = torch.randint(0, 320, (2, 40), generator=torch.Generator().manual_seed(0))
    expected = model.eval()(ids)[0]
    assert (hf.eval()(input_ids=ids).logits - expected).abs().max().item() <= 1e-5
    assert expected.abs().max() > 0.1
    if tie:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 3)
    assert (out / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert (out / "tokenizer.json").is_file()
    assert (out / "generation_config.json").is_file()


# Text that trips tokenizer translations: leading, trailing and repeated whitespace (sentencepiece's
# dummy prefix), other whitespace, unicode (CJK, combining marks, scripts never seen in training),
# emoji (byte fallback), digits (split one by one), punctuation, text spelling special pieces.
HARD_STRINGS = [
    "", " ", "   ", " " * 33, "\n", "\t", " \n ", "\n\n\n", "Hello", " Hello", "  Hello", "Hello ", "Hello  ",
    "   Hello   world   ", "a  b   c    d", "\nleading newline", "trailing newline\n", "two\n\nnewlines",
    "\r\n windows \r\n", "tab\tinside", "\t leading tab", "mixed \t \n whitespace", 'Once upon a time, Lily said "hi!"',
    "It's Tom's dog.", "Digits 0123456789", "3.14159 and 2,718", "  42", "1st 2nd 3rd", "(parens) [brackets] {braces}",
    "!?.,;:-_'\"`~@#$%^&*+=|\\/<>", "café naïve résumé", "e\u0301 (e + combining acute) vs é", "n\u0303a\u0308",
    "Straße", "東京タワー", "北京 上海", "한국어 텍스트", "Привет, мир", "مرحبا", "हिन्दी", "🐉", " 🐉", "🐉🐉",
    "👍🏽 👨‍👩‍👧", "flag 🇯🇵", "\u200b zero width", "\u00a0non-breaking space", "▁ the metasymbol itself",
    "<s> spells BOS", "</s><pad><unk>", "<0x41> spells a byte piece", "the the the the", "Lily" * 20, "x" * 200,
    "ALL CAPS", "mIxEd CaSe", "\x00 nul \x7f del",
]


def assert_same_as_nanotrain(hf_tokenizer, ours, texts, seed=0):
    """Encode (with nanotrain's BOS) and decode agree on every text, and decoding agrees on id sequences
    like a model's output: pieces, byte runs of whole characters and special ids in any order."""
    mismatches = []
    for text in texts:
        ids = hf_tokenizer(text)["input_ids"]
        expected = [ours.bos_id] + ours.encode(text)
        decoded = hf_tokenizer.decode(expected, skip_special_tokens=True)
        if ids != expected or decoded != ours.decode(expected):
            mismatches.append((text, ids, expected, decoded))
    assert mismatches == []
    assert hf_tokenizer(texts)["input_ids"] == [[ours.bos_id] + ids for ids in ours.encode_batch(texts)]

    rng = random.Random(seed)
    processor = ours.processor
    pieces = [i for i in range(ours.vocab_size)
              if not (processor.is_byte(i) or processor.is_control(i) or processor.is_unknown(i))]
    byte_runs = [ours.encode(char)[1:] for char in "🐉😀"]  # whole UTF-8 characters as <0xXX> pieces (after "▁")
    assert all(processor.is_byte(i) for run in byte_runs for i in run), "the test needs characters that fall back"
    for _ in range(300):
        ids = []
        for _ in range(rng.randint(1, 15)):
            kind = rng.random()
            if kind < 0.1:
                ids.append(rng.choice([ours.bos_id, ours.eos_id]))
            elif kind < 0.3:
                ids += rng.choice(byte_runs)
            else:
                ids.append(rng.choice(pieces))
        assert hf_tokenizer.decode(ids, skip_special_tokens=True) == ours.decode(ids), ids


def test_exported_tokenizer_encodes_and_decodes_exactly_as_nanotrain(tmp_path, tokenizer_path):
    transformers = pytest.importorskip("transformers")
    from nanotrain.data.tokenizer import Tokenizer

    ckpt, _ = make_checkpoint(tmp_path / "ckpt", tokenizer_path)
    out = export_hf(ckpt, tmp_path / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ours = Tokenizer.load(tokenizer_path)
    assert len(HARD_STRINGS) >= 50
    assert_same_as_nanotrain(hf_tokenizer, ours, HARD_STRINGS)
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (
        ours.bos_id, ours.eos_id, ours.pad_id)
    assert (out / "tokenizer.model").read_bytes() == tokenizer_path.read_bytes()  # kept for sentencepiece users


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared TinyStories samples are not next to the repo")
def test_exported_tokenizer_matches_on_real_tinystories_text(tmp_path):
    transformers = pytest.importorskip("transformers")
    from nanotrain.data.tokenizer import Tokenizer
    from nanotrain.hf.tokenizer_json import tokenizer_files

    lines = (SHARED / "tinystories_v2_train_head_10k_lines.txt").read_text(encoding="utf-8").splitlines()
    ours = Tokenizer.train(lines[:4000], 2048)  # a real vocabulary: long pieces, many merges
    for name, content in tokenizer_files(ours, 512).items():
        (tmp_path / name).write_text(json.dumps(content))
    held_out = [line for line in lines[6000:6400] if line.strip()]
    assert_same_as_nanotrain(transformers.AutoTokenizer.from_pretrained(tmp_path), ours, held_out + HARD_STRINGS)


def test_export_refuses_a_tokenizer_it_cannot_translate_exactly(tmp_path, capsys):
    import io

    import sentencepiece as spm

    from nanotrain.data.stories import generate_stories

    model = io.BytesIO()  # sentencepiece's defaults: a unigram model with NFKC normalization
    spm.SentencePieceTrainer.train(sentence_iterator=iter(generate_stories(100)), model_writer=model,
                                   vocab_size=320, minloglevel=2)
    (tmp_path / "unigram.model").write_bytes(model.getvalue())
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", tmp_path / "unigram.model")
    with pytest.raises(SystemExit) as exit_info:
        main(["--checkpoint", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert err.startswith("error: the checkpoint's tokenizer.model uses the unigram model type") and "NFKC" in err
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("tie", [False, True])
def test_export_then_import_gives_identical_weights(tmp_path, tokenizer_path, tie):
    ckpt, model = make_checkpoint(tmp_path / "ckpt", tokenizer_path, tie=tie)
    back = import_hf(export_hf(ckpt, tmp_path / "hf"), tmp_path / "back")
    imported, cfg, tokenizer = load_inference(back)
    original_cfg = load_config(str(ckpt / "config.toml"))
    assert cfg.model == original_cfg.model
    assert imported.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(imported.state_dict()[name], tensor), name
    assert tokenizer.sha256 == load_inference(ckpt)[2].sha256


def test_imported_checkpoint_trains_and_generates(tmp_path, tokenizer_path, capsys):
    from nanotrain.generate import main as generate_main
    from nanotrain.training.trainer import train

    ckpt, _ = make_checkpoint(tmp_path / "ckpt", tokenizer_path)
    back = import_hf(export_hf(ckpt, tmp_path / "hf"), tmp_path / "back")
    generate_main(["--checkpoint", str(back), "--prompt", "Once upon a time", "--max_new_tokens", "4"])
    assert capsys.readouterr().out.startswith("Once upon a time")

    cfg = load_config(str(back / "config.toml"), [
        "--data.source=random", "--train.max_steps=2", "--train.batch_size=2", "--train.seq_len=16",
        "--train.eval_every=0", "--train.eval_steps=1", "--train.log_every=1", f"--train.out_dir={tmp_path / 'run'}",
        "--checkpoint.resume=none", f"--train.init_from={back}", "--train.lr=1e-9", "--optim.warmup_steps=0",
    ])
    start = load_inference(back)[0].state_dict()
    trained = train(cfg).model.state_dict()
    # A learning rate of 1e-9 barely moves the weights: they started from the import, not from init.
    assert all(torch.allclose(trained[k], start[k], atol=1e-6) for k in start)


def test_init_from_refuses_a_different_model_shape(tmp_path, tokenizer_path):
    from nanotrain.checkpoint.checkpointer import load_pretrained

    ckpt, _ = make_checkpoint(tmp_path / "ckpt", tokenizer_path)
    cfg = load_config(str(ckpt / "config.toml"), ["--model.n_layers=3"])
    with pytest.raises(CheckpointError, match="model.n_layers = 2 but this run sets 3"):
        load_pretrained(build_model(cfg.model), cfg.model, ckpt)


def test_gpt_export_is_refused_and_nothing_is_written(tmp_path):
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", flavour="gpt")
    with pytest.raises(ExportError, match="gpt flavour has no LlamaForCausalLM equivalent"):
        export_hf(ckpt, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], "a temporary directory was left behind"


def hf_dir_with(tmp_path, tokenizer_path, remove=(), **config_changes):
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", tokenizer_path)
    out = export_hf(ckpt, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    config.update(config_changes)
    for key in remove:
        del config[key]
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_scaling": {"type": "dynamic", "factor": 2.0}}, "rope_scaling = {'type': 'dynamic'"),  # older spelling
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     "rope_parameters = {'rope_type': 'llama3'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5}},
     "partial_rotary_factor = 0.5"),
    ({"partial_rotary_factor": 0.25}, "partial_rotary_factor = 0.25"),
    ({"rope_scaling": 2.0}, "rope_scaling = 2.0; expected an object"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"head_dim": 16}, "head_dim 16 x 4 heads != hidden_size 32"),
    ({"model_type": "mistral", "architectures": ["MistralForCausalLM"]}, "only Llama"),
    ({"num_hidden_layers": 3}, "lack"),
])
def test_import_refuses_unsupported_configs(tmp_path, tokenizer_path, capsys, change, message):
    hf = hf_dir_with(tmp_path, tokenizer_path, **change)
    with pytest.raises(SystemExit) as exit_info:
        main(["--hf", str(hf), "--out", str(tmp_path / "back")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "back").exists()


@pytest.mark.parametrize("change, remove", [
    ({"hidden_act": "swish"}, ()),  # transformers' other name for SiLU
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}}, ("rope_theta", "rope_scaling")),  # v5
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 500.0}, "rope_theta": 10000.0}, ()),  # dict wins
    ({"rope_scaling": {"type": "default"}}, ()),
])
def test_import_accepts_other_spellings_of_the_same_model(tmp_path, tokenizer_path, change, remove):
    transformers = pytest.importorskip("transformers")
    hf = hf_dir_with(tmp_path, tokenizer_path, remove=remove, **change)
    # transformers reads the same RoPE base from this config.json
    assert transformers.AutoConfig.from_pretrained(hf).rope_parameters["rope_theta"] == 500.0
    back = import_hf(hf, tmp_path / "back")
    assert load_config(str(back / "config.toml")).model == load_config(str(tmp_path / "ckpt" / "config.toml")).model


def test_cli_export_refuses_an_existing_output(tmp_path, capsys):
    ckpt, _ = make_checkpoint(tmp_path / "ckpt")
    (tmp_path / "hf").mkdir()
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_written_file_has_the_same_mode(tmp_path, tokenizer_path, umask):
    """model.safetensors too: safetensors writes a private (0600) file, nanotrain gives it the umask's mode."""
    import os

    previous = os.umask(umask)
    try:
        ckpt, _ = make_checkpoint(tmp_path / "ckpt", tokenizer_path)
        hf = export_hf(ckpt, tmp_path / "hf")
        back = import_hf(hf, tmp_path / "back")
    finally:
        os.umask(previous)
    for directory in (ckpt, hf, back):
        modes = {path.name: oct(path.stat().st_mode & 0o777) for path in directory.iterdir()}
        assert "model.safetensors" in modes and set(modes.values()) == {oct(0o666 & ~umask)}, modes
