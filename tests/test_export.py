"""Export to Hugging Face (logits parity in transformers) and import back (identical weights)."""

import json

import pytest
import torch

from nanotrain.checkpoint import load_inference, save_inference
from nanotrain.config import load_config
from nanotrain.export import ExportError, export_hf, import_hf, main
from nanotrain.model import build_model


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
    from nanotrain.stories import generate_stories
    from nanotrain.tokenizer import Tokenizer

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
    assert json.loads((out / "tokenizer_config.json").read_text())["tokenizer_class"] == "LlamaTokenizer"
    assert (out / "generation_config.json").is_file()


def test_exported_tokenizer_loads_in_transformers_with_equal_ids(tmp_path, tokenizer_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf", reason="transformers reads a sentencepiece model through protobuf")
    from nanotrain.tokenizer import Tokenizer

    ckpt, _ = make_checkpoint(tmp_path / "ckpt", tokenizer_path)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(export_hf(ckpt, tmp_path / "hf"))
    ours = Tokenizer.load(tokenizer_path)
    text = 'Once upon a time, Lily saw a 🐉 and said "hello".'  # the dragon is byte fallback
    assert hf_tokenizer(text)["input_ids"] == [ours.bos_id] + ours.encode(text)
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (
        ours.bos_id, ours.eos_id, ours.pad_id)
    assert hf_tokenizer.decode(hf_tokenizer(text)["input_ids"], skip_special_tokens=True) == text


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
    from nanotrain.train import train

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
    from nanotrain.checkpoint import CheckpointError, load_pretrained

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


def hf_dir_with(tmp_path, tokenizer_path, **config_changes):
    ckpt, _ = make_checkpoint(tmp_path / "ckpt", tokenizer_path)
    out = export_hf(ckpt, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    config.update(config_changes)
    (out / "config.json").write_text(json.dumps(config))
    return out


@pytest.mark.parametrize("change, message", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "rope_scaling"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_scaling"),
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


def test_cli_export_refuses_an_existing_output(tmp_path, capsys):
    ckpt, _ = make_checkpoint(tmp_path / "ckpt")
    (tmp_path / "hf").mkdir()
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(ckpt), "--format", "hf", "--out", str(tmp_path / "hf")])
    assert "already exists" in capsys.readouterr().err
