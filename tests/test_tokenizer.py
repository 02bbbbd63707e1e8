"""Tokenizer: deterministic training, fixed special ids, byte fallback, loading foreign models."""

import io

import pytest
import sentencepiece as spm

from nanotrain.data.stories import generate_stories
from nanotrain.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, SentencePieceTokenizer, Tokenizer
from nanotrain.errors import TokenizerError


@pytest.fixture(scope="module")
def corpus():
    return generate_stories(200, seed=3)


@pytest.fixture(scope="module")
def tok(corpus):
    return Tokenizer.train(corpus, 400)


def test_training_is_deterministic_and_ids_are_fixed(corpus, tok):
    again = Tokenizer.train(corpus, 400)
    assert again.file_bytes == tok.file_bytes and again.sha256 == tok.sha256
    assert (tok.unk_id, tok.bos_id, tok.eos_id, tok.pad_id) == (UNK_ID, BOS_ID, EOS_ID, PAD_ID) == (0, 1, 2, 3)
    assert tok.vocab_size == 400 and tok.has_pad


@pytest.mark.parametrize("text", ["Lily found a red ball.", "Zebra café 東京 🎉🐉 ÆØÅ", "  two  spaces\nnew line\ttab"])
def test_round_trip_including_characters_never_seen_in_training(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert UNK_ID not in ids  # byte fallback: nothing becomes <unk>


def test_unseen_characters_use_byte_pieces(tok):
    pieces = [tok.processor.id_to_piece(i) for i in tok.encode("🐉")]
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x90>", "<0x89>"]  # the 4 UTF-8 bytes of U+1F409


def test_encode_batch_matches_encode_and_adds_bos_eos(tok, corpus):
    texts = corpus[:5]
    assert tok.encode_batch(texts, bos=True, eos=True) == [tok.encode(t, bos=True, eos=True) for t in texts]
    assert tok.encode("hi", bos=True, eos=True)[0] == BOS_ID and tok.encode("hi", eos=True)[-1] == EOS_ID


def test_load_keeps_the_file_unchanged(tok, tmp_path):
    path = tok.save(tmp_path / "tokenizer.model")
    loaded = Tokenizer.load(path)
    assert loaded.sha256 == tok.sha256 and path.read_bytes() == tok.file_bytes
    assert loaded.encode("Once upon a time") == tok.encode("Once upon a time")


def test_model_without_pad_falls_back_to_eos(corpus, tmp_path):
    """Llama 2's tokenizer.model has no pad piece (pad_id -1); padding then uses eos."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, pad_id=-1, minloglevel=2)
    (tmp_path / "llama_like.model").write_bytes(model.getvalue())
    loaded = Tokenizer.load(tmp_path / "llama_like.model")
    assert not loaded.has_pad and loaded.pad_id == loaded.eos_id == 2


def test_errors_are_one_line(corpus, tmp_path):
    with pytest.raises(TokenizerError, match="too large for this data"):
        Tokenizer.train(corpus[:3], 5000)
    with pytest.raises(TokenizerError, match="too small"):
        Tokenizer.train(corpus, 100)
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.model")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="neither a sentencepiece .model nor a Hugging Face tokenizer.json"):
        Tokenizer.load(tmp_path / "junk.model")


@pytest.mark.parametrize("settings", [
    None,  # nanotrain's own training settings
    {},  # sentencepiece's defaults: unigram, NFKC rules, extra whitespace removed
    {"model_type": "bpe", "add_dummy_prefix": False, "treat_whitespace_as_suffix": True,
     "user_defined_symbols": ["<sep>"]},
])
def test_spec_reads_the_model_settings_as_protobuf_does(corpus, tok, settings):
    model_pb2 = pytest.importorskip("sentencepiece.sentencepiece_model_pb2", reason="the reference needs protobuf")
    if settings is not None:
        model = io.BytesIO()
        spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus), model_writer=model, vocab_size=300,
                                       minloglevel=2, **settings)
        tok = SentencePieceTokenizer(model.getvalue())
    proto = model_pb2.ModelProto()
    proto.ParseFromString(tok.file_bytes)
    kinds = {1: "normal", 2: "unknown", 3: "control", 4: "user_defined", 5: "unused", 6: "byte"}
    assert tok.spec.pieces == tuple((p.piece, p.score, kinds[p.type]) for p in proto.pieces)
    assert tok.spec.model_type == {1: "unigram", 2: "bpe"}[proto.trainer_spec.model_type]
    normalizer = proto.normalizer_spec
    assert (tok.spec.byte_fallback, tok.spec.whitespace_as_suffix) == (
        proto.trainer_spec.byte_fallback, proto.trainer_spec.treat_whitespace_as_suffix)
    assert (tok.spec.add_dummy_prefix, tok.spec.remove_extra_whitespaces, tok.spec.escape_whitespaces) == (
        normalizer.add_dummy_prefix, normalizer.remove_extra_whitespaces, normalizer.escape_whitespaces)
    assert (tok.spec.normalization_rules, tok.spec.denormalization_rules) == (
        bool(normalizer.precompiled_charsmap), bool(proto.denormalizer_spec.precompiled_charsmap))
    if settings == {}:
        assert tok.spec.model_type == "unigram" and tok.spec.normalization_rules and tok.spec.remove_extra_whitespaces
    if settings and "user_defined_symbols" in settings:
        assert not tok.spec.add_dummy_prefix and tok.spec.whitespace_as_suffix
        assert ("<sep>", 0.0, "user_defined") in tok.spec.pieces


def test_spec_of_a_truncated_model_is_one_line(tok):
    truncated = SentencePieceTokenizer(tok.file_bytes)
    truncated.file_bytes = tok.file_bytes[:-3]  # sentencepiece holds the whole model; only the bytes are cut
    with pytest.raises(TokenizerError, match="truncated"):
        truncated.spec
