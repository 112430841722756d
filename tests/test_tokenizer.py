"""Byte and SentencePiece tokenizers: layout, EOS/padding/truncation, round trips, errors."""

import numpy as np
import pytest

from avatarv_jax.models.tokenizer import ByteTokenizer, SentencePieceTokenizer, make_tokenizer

TEXTS = ["Hello, world!", "你好，世界。今天天气很好。", "नमस्ते दुनिया", "", "ça va? 👋"]

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a woman speaks to the camera in a bright kitchen",
    "a man smiles and nods while talking in an office",
    "the person turns their head and blinks slowly",
    "你好世界 今天天气很好 我们一起说话",
    "नमस्ते दुनिया आज मौसम अच्छा है",
]


def test_byte_layout_matches_byt5_convention():
    tok = ByteTokenizer()
    assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 1, 259)
    ids, mask = tok.encode(["Ab", "é"], max_length=5)
    # 'A' = 65, 'b' = 98, 'é' = C3 A9 in UTF-8; every byte shifted by 3, then EOS, then pad.
    np.testing.assert_array_equal(ids, [[68, 101, 1, 0, 0], [0xC3 + 3, 0xA9 + 3, 1, 0, 0]])
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    assert ids.dtype == np.int32 and mask.dtype == bool


def test_byte_round_trip_unicode():
    tok = ByteTokenizer()
    ids, mask = tok.encode(TEXTS, max_length=64)
    assert tok.decode(ids) == TEXTS
    assert tok.decode(ids[1]) == TEXTS[1]
    lengths = [len(t.encode("utf-8")) + 1 for t in TEXTS]
    np.testing.assert_array_equal(mask.sum(1), lengths)
    for row, n in zip(ids, lengths):
        assert row[n - 1] == tok.eos_id and np.all(row[n:] == tok.pad_id)
        assert np.all(row[:n - 1] >= 3)


def test_byte_truncation_keeps_eos_and_yields_a_prefix():
    tok = ByteTokenizer()
    text = "你好，世界"  # 3 bytes per character
    ids, mask = tok.encode([text], max_length=6)  # room for 5 bytes: one whole char + 2 bytes
    assert mask.all() and ids[0, -1] == tok.eos_id
    assert tok.decode(ids[0]) == "你"  # the split character is dropped, not garbled
    ids, mask = tok.encode(["abc"], max_length=1)
    np.testing.assert_array_equal(ids, [[tok.eos_id]])


def test_decode_stops_at_eos_and_validates():
    tok = ByteTokenizer()
    assert tok.decode([ord("h") + 3, ord("i") + 3, 1, ord("x") + 3]) == "hi"
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([300])
    with pytest.raises(ValueError, match="rank 1 or 2"):
        tok.decode(np.zeros((1, 1, 1), np.int32))


def test_encode_rejects_bad_arguments():
    tok = ByteTokenizer()
    with pytest.raises(TypeError, match="single str"):
        tok.encode("hello", 8)
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        tok.encode(["a", 3], 8)
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        tok.encode(["a"], 0)


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
    import sentencepiece as spm

    prefix = tmp_path_factory.mktemp("spm") / "tiny"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 4), model_prefix=str(prefix), vocab_size=400,
        model_type="unigram", character_coverage=1.0, byte_fallback=True,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
        minloglevel=2, num_threads=1)
    return str(prefix) + ".model"


def test_sentencepiece_round_trip(spm_model):
    tok = make_tokenizer(spm_model)
    assert isinstance(tok, SentencePieceTokenizer)
    assert (tok.pad_id, tok.eos_id) == (0, 1)
    # "€" is not in the training corpus: it goes through SentencePiece's byte fallback.
    texts = ["a woman speaks to the camera", "你好世界", "नमस्ते दुनिया", "zebra quartz 5€"]
    ids, mask = tok.encode(texts, max_length=48)
    assert ids.shape == (4, 48) and ids.max() < tok.vocab_size
    assert tok.decode(ids) == texts
    for row, m in zip(ids, mask):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()
        assert row[n - 1] == tok.eos_id and np.all(row[n:] == tok.pad_id)


def test_sentencepiece_truncation_keeps_eos(spm_model):
    tok = SentencePieceTokenizer(spm_model)
    full, full_mask = tok.encode([CORPUS[0]], max_length=64)
    n = int(full_mask.sum())
    assert n > 5
    ids, mask = tok.encode([CORPUS[0]], max_length=4)
    assert mask.all() and ids[0, -1] == tok.eos_id
    np.testing.assert_array_equal(ids[0, :3], full[0, :3])


def test_make_tokenizer_defaults_to_bytes():
    assert isinstance(make_tokenizer(None), ByteTokenizer)
    assert isinstance(make_tokenizer(""), ByteTokenizer)


def test_missing_and_corrupt_model_files_name_the_path(tmp_path):
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match="nope.model"):
        make_tokenizer(missing)
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"definitely not a protobuf")
    with pytest.raises(ValueError, match="bad.model"):
        SentencePieceTokenizer(bad)
