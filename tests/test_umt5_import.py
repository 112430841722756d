"""Importing umT5 encoder weights from transformers: parity, config handling, one-error reports."""

import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from avatarv_jax.io import CheckpointMismatchError, load_safetensors
from avatarv_jax.io.umt5 import (
    config_from_transformers,
    expected_shapes,
    import_umt5,
    load_umt5_tokenizer,
)
from avatarv_jax.models.text_encoder import TextEncoderConfig

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

HF_KW = {"vocab_size": 300, "d_model": 32, "d_kv": 8, "num_heads": 4, "d_ff": 64,
         "num_layers": 2, "feed_forward_proj": "gated-gelu",
         "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128}
CFG = TextEncoderConfig(vocab_size=300, d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2)


def _randomise(model):
    """Non-trivial norm scales and larger weights, so a mix-up cannot hide in near-identity."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layer_norm.weight"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif "relative_attention_bias" in name:
                p.copy_(torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """A random tiny ``UMT5EncoderModel`` saved as safetensors: (model, folder)."""
    torch.manual_seed(0)
    model = transformers.UMT5EncoderModel(transformers.UMT5Config(**HF_KW)).eval()
    _randomise(model)
    folder = tmp_path_factory.mktemp("umt5") / "text_encoder"
    model.save_pretrained(folder, safe_serialization=True)
    return model, folder


@pytest.fixture(scope="module")
def imported(hf):
    return import_umt5(hf[1])


def _ids_and_mask():
    rng = np.random.default_rng(1)
    ids = rng.integers(2, 300, size=(3, 40)).astype(np.int32)
    lengths = [40, 23, 7]
    mask = np.arange(40)[None, :] < np.asarray(lengths)[:, None]
    ids[~mask] = 0                                    # pad id
    return ids, mask


def _hf_hidden(model, ids, mask):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids.astype(np.int64)),
                    attention_mask=torch.from_numpy(mask.astype(np.int64)))
    return out.last_hidden_state.numpy()


def test_config_read_from_config_json(imported):
    encoder, report = imported
    assert encoder.cfg == CFG
    assert report.tensors == 2 + 2 * 10          # shared, final norm, 10 per layer
    assert report.parameters == sum(int(np.prod(v.shape)) for v in
                                    load_safetensors(report.source).values())
    assert report.source_dtypes == {"F32": report.tensors}


def test_parity_with_transformers(hf, imported):
    model, _ = hf
    encoder, _ = imported
    ids, mask = _ids_and_mask()
    ref = _hf_hidden(model, ids, mask)
    ours = np.asarray(encoder(jnp.asarray(ids), jnp.asarray(mask)))
    diff = np.abs(ours - ref)[mask]
    assert diff.max() <= 1e-4, diff.max()
    assert np.abs(ref[mask]).mean() > 0.1          # the comparison is not between near-zeros
    assert np.all(ours[~mask] == 0)


def test_parity_distances_past_max_distance(tmp_path):
    """Long inputs use the log-spaced buckets up to and beyond ``max_distance``."""
    kw = {**HF_KW, "relative_attention_max_distance": 20, "relative_attention_num_buckets": 8}
    model = transformers.UMT5EncoderModel(transformers.UMT5Config(**kw)).eval()
    _randomise(model)
    model.save_pretrained(tmp_path, safe_serialization=True)
    encoder, _ = import_umt5(tmp_path)
    assert (encoder.cfg.num_buckets, encoder.cfg.max_distance) == (8, 20)
    ids = np.random.default_rng(2).integers(2, 300, size=(1, 64)).astype(np.int32)
    mask = np.ones_like(ids, dtype=bool)
    diff = np.abs(np.asarray(encoder(jnp.asarray(ids), jnp.asarray(mask)))
                  - _hf_hidden(model, ids, mask))
    assert diff.max() <= 1e-4, diff.max()


def test_full_encoder_decoder_checkpoint_skips_decoder(hf, tmp_path):
    torch.manual_seed(3)
    full = transformers.UMT5ForConditionalGeneration(transformers.UMT5Config(**HF_KW)).eval()
    _randomise(full)
    full.save_pretrained(tmp_path, safe_serialization=True)
    encoder, report = import_umt5(tmp_path)
    note = " ".join(report.notes)
    assert "skipped" in note and "decoder." in note
    ids, mask = _ids_and_mask()
    enc_only = transformers.UMT5EncoderModel(transformers.UMT5Config(**HF_KW)).eval()
    state = {k: v for k, v in full.state_dict().items()
             if not k.startswith(("decoder.", "lm_head."))}
    result = enc_only.load_state_dict(state, strict=False)
    assert not result.missing_keys
    ref = _hf_hidden(enc_only, ids, mask)
    diff = np.abs(np.asarray(encoder(jnp.asarray(ids), jnp.asarray(mask))) - ref)[mask]
    assert diff.max() <= 1e-4, diff.max()


def test_bare_file_needs_cfg_and_cfg_must_agree(hf, tmp_path):
    _, folder = hf
    bare = shutil.copy(folder / "model.safetensors", tmp_path / "umt5.safetensors")
    with pytest.raises(ValueError, match="pass cfg"):
        import_umt5(bare)
    encoder, _ = import_umt5(bare, CFG, dtype=jnp.bfloat16)
    assert encoder.cfg.dtype == jnp.bfloat16
    with pytest.raises(ValueError, match="d_ff: given 128"):
        import_umt5(folder, TextEncoderConfig(**{**CFG.__dict__, "d_ff": 128}))


def test_pipeline_root_resolves_to_text_encoder(hf):
    _, folder = hf
    encoder, report = import_umt5(folder.parent)
    assert "text_encoder" in report.source and encoder.cfg == CFG


@pytest.mark.parametrize("change, message", [
    ({"feed_forward_proj": "relu"}, "feed_forward_proj='relu'"),
    ({"model_type": "bart"}, "model_type is 'bart'"),
])
def test_unsupported_configs_are_refused(change, message):
    hf_config = {**HF_KW, "model_type": "umt5", **change}
    with pytest.raises(ValueError, match=message):
        config_from_transformers(hf_config)


def test_t5_config_shares_one_position_bias():
    cfg = config_from_transformers({**HF_KW, "model_type": "t5"})
    assert not cfg.position_bias_per_layer
    names = expected_shapes(cfg)
    bias = [k for k in names if "relative_attention_bias" in k]
    assert bias == ["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]


def _rewrite(folder, dest, edit):
    """Copy the checkpoint folder to ``dest`` with ``edit(tensors)`` applied to its tensors."""
    shutil.copytree(folder, dest)
    tensors = load_safetensors(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(dest / "model.safetensors"))
    return dest


def test_one_error_names_missing_extra_and_wrong_shape(hf, tmp_path):
    _, folder = hf
    missing = "encoder.block.1.layer.1.DenseReluDense.wo.weight"
    wrong = "encoder.block.0.layer.0.SelfAttention.q.weight"

    def edit(t):
        del t[missing]
        t["encoder.block.2.layer.0.layer_norm.weight"] = np.ones(32, np.float32)
        t[wrong] = np.zeros((32, 31), np.float32)

    bad = _rewrite(folder, tmp_path / "bad", edit)
    with pytest.raises(CheckpointMismatchError) as info:
        import_umt5(bad)
    msg = str(info.value)
    assert "3 problems" in msg
    assert missing in msg and "expected shape (32, 64)" in msg
    assert "encoder.block.2.layer.0.layer_norm.weight" in msg
    assert wrong in msg and "expected (32, 32), found (32, 31)" in msg
    assert set(info.value.missing) == {missing}
    assert set(info.value.mismatched) == {wrong}


def test_embedding_saved_under_its_tied_alias(hf, tmp_path):
    _, folder = hf

    def edit(t):
        t["encoder.embed_tokens.weight"] = t.pop("shared.weight")

    alias = _rewrite(folder, tmp_path / "alias", edit)
    encoder, _ = import_umt5(alias)
    np.testing.assert_array_equal(
        np.asarray(encoder.embedding[...]),
        load_safetensors(folder / "model.safetensors")["shared.weight"])


def test_bf16_checkpoint_is_upcast(hf, tmp_path):
    import ml_dtypes

    _, folder = hf
    bf16 = _rewrite(folder, tmp_path / "bf16", lambda t: t.update(
        {k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}))
    encoder, report = import_umt5(bf16)
    assert report.source_dtypes == {"BF16": report.tensors}
    assert encoder.layers.attn.q.kernel[...].dtype == jnp.float32


def test_load_umt5_tokenizer(tmp_path):
    import sentencepiece as spm

    tok_dir = tmp_path / "tokenizer"
    tok_dir.mkdir()
    corpus = ["a talking head video of a person", "ein Mensch spricht in die Kamera",
              "une personne parle", "hello world"] * 8
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_prefix=str(tok_dir / "spiece"), vocab_size=60,
        model_type="unigram", character_coverage=1.0, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
        hard_vocab_limit=False, minloglevel=2, num_threads=1)
    for where in (tok_dir, tmp_path):               # the folder itself or the pipeline root
        tok = load_umt5_tokenizer(where)
        ids, mask = tok.encode(["hello world"], 16)
        assert tok.decode(ids[0]) == "hello world" and mask[0].sum() >= 2
    (tok_dir / "spiece.model").rename(tok_dir / "other.model")
    with pytest.raises(FileNotFoundError, match="no spiece.model"):
        load_umt5_tokenizer(tok_dir)
