"""wav2vec 2.0 encoder and importer: parity with transformers on both layouts, one-error reports."""

import json
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from avatarv_jax.io import CheckpointMismatchError, load_safetensors
from avatarv_jax.io.wav2vec2 import expected_shapes, fold_weight_norm, import_wav2vec2
from avatarv_jax.models.audio_encoder import (
    AudioEncoder,
    AudioEncoderConfig,
    num_video_frames,
)
from avatarv_jax.models.wav2vec2 import Wav2Vec2Config, Wav2Vec2Encoder

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "intermediate_size": 64, "conv_dim": (16, 16, 16), "conv_kernel": (10, 3, 3),
        "conv_stride": (5, 2, 2), "num_conv_pos_embeddings": 16,
        "num_conv_pos_embedding_groups": 4}
# (feat_extract_norm, do_stable_layer_norm, conv_bias): the base and the large layout.
LAYOUTS = {"base": ("group", False, False), "large": ("layer", True, True)}
SAMPLES = 1203   # 59 frames at total stride 20; not a multiple of any stride


def _hf():
    pytest.importorskip("torch")
    return pytest.importorskip("transformers")


def _hf_config(layout, **extra):
    norm, stable, bias = LAYOUTS[layout]
    return _hf().Wav2Vec2Config(**TINY, feat_extract_norm=norm, do_stable_layer_norm=stable,
                                conv_bias=bias, **extra)


def _randomise(model, seed):
    import torch

    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if name.endswith("norm.weight") else 0.0
            p.copy_(base + 0.3 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=sorted(LAYOUTS))
def hf_model(request, tmp_path_factory):
    """A random tiny transformers ``Wav2Vec2Model`` saved as safetensors: (layout, model, dir)."""
    model = _randomise(_hf().Wav2Vec2Model(_hf_config(request.param)), seed=0)
    folder = tmp_path_factory.mktemp(f"w2v_{request.param}")
    model.save_pretrained(folder, safe_serialization=True)
    return request.param, model, folder


@pytest.fixture(scope="module")
def imported(hf_model):
    return import_wav2vec2(hf_model[2])


def _wave(batch=2, samples=SAMPLES, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, samples)).astype(np.float32)


def _reference(model, wave):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(wave)).last_hidden_state.numpy()


def _max_diff(encoder, model, wave):
    ours = np.asarray(encoder(jnp.asarray(wave)))
    ref = _reference(model, wave)
    assert ours.shape == ref.shape
    return float(np.abs(ours - ref).max()), float(np.abs(ref).max())


# ----- without transformers -----------------------------------------------------------------

def test_presets_and_frame_count():
    base, large = Wav2Vec2Config.base(), Wav2Vec2Config.large()
    assert (base.hidden_size, base.num_hidden_layers, base.num_attention_heads,
            base.intermediate_size) == (768, 12, 12, 3072)
    assert (base.feat_extract_norm, base.do_stable_layer_norm) == ("group", False)
    assert (large.hidden_size, large.num_hidden_layers, large.num_attention_heads,
            large.intermediate_size) == (1024, 24, 16, 4096)
    assert (large.feat_extract_norm, large.do_stable_layer_norm) == ("layer", True)
    assert base.conv_dim == (512,) * 7 and base.total_stride == 320 and base.fps == 50.0
    # Receptive field 400 samples, hop 320: floor((N - 400) / 320) + 1 frames.
    for n, frames in ((16000, 49), (16399, 50), (16400, 51), (48000, 149)):
        assert base.num_frames(n) == frames
    assert base.num_frames(399) == 0 and base.num_frames(400) == 1
    with pytest.raises(ValueError, match="feat_extract_norm"):
        Wav2Vec2Config.tiny(feat_extract_norm="batch")
    with pytest.raises(ValueError, match="same"):
        Wav2Vec2Config.tiny(conv_kernel=(10, 3))


def test_tiny_encoder_shapes_and_axis_names():
    from flax import nnx

    for stable in (False, True):
        cfg = Wav2Vec2Config.tiny(do_stable_layer_norm=stable,
                                  feat_extract_norm="layer" if stable else "group")
        enc = Wav2Vec2Encoder(cfg, rngs=nnx.Rngs(0))
        out = enc(jnp.asarray(_wave(1)))
        assert out.shape == (1, cfg.num_frames(SAMPLES), cfg.hidden_size) == (1, 59, 32)
        assert np.isfinite(np.asarray(out)).all()
        assert enc.layers.attention.q_proj.kernel[...].shape == (2, 32, 32)
        assert enc.layers.attention.q_proj.kernel.out_sharding == ("layers", "embed", "heads")
        assert enc.pos_conv.kernel.out_sharding == (None, None, "embed")
        assert (enc.feature_extractor[1].norm is None) == (not stable)
    with pytest.raises(ValueError, match="too few"):
        enc(jnp.zeros((1, 9)))


def test_fold_weight_norm_normalises_each_tap():
    rng = np.random.default_rng(0)
    v = rng.standard_normal((8, 2, 5))
    g = rng.uniform(0.5, 2.0, (1, 1, 5))
    w = fold_weight_norm(g, v)
    np.testing.assert_allclose(np.sqrt((w ** 2).sum(axis=(0, 1))), g[0, 0], rtol=1e-12)
    np.testing.assert_allclose(w[:, :, 3] / g[0, 0, 3], v[:, :, 3] / np.linalg.norm(v[:, :, 3]))


# ----- parity with transformers -------------------------------------------------------------

def test_tables_match_transformers(hf_model):
    layout, _, folder = hf_model
    cfg = Wav2Vec2Config(**TINY, feat_extract_norm=LAYOUTS[layout][0],
                         do_stable_layer_norm=LAYOUTS[layout][1], conv_bias=LAYOUTS[layout][2])
    theirs = {k: tuple(v.shape) for k, v in load_safetensors(folder).items()
              if k != "masked_spec_embed"}
    assert expected_shapes(cfg, "parametrizations") == theirs


def test_forward_matches_transformers(hf_model, imported):
    layout, model, _ = hf_model
    encoder, report = imported
    assert encoder.cfg.do_stable_layer_norm == (layout == "large")
    assert encoder.cfg.feat_extract_norm == LAYOUTS[layout][0]
    # Ours counts the folded positional kernel: transformers' extra g (one per tap) is gone.
    assert report.parameters == sum(p.numel() for n, p in model.named_parameters()
                                    if n != "masked_spec_embed") - TINY["num_conv_pos_embeddings"]
    assert any("config.json" in n for n in report.notes)
    assert any("masked_spec_embed" in n for n in report.notes)
    diff, scale = _max_diff(encoder, model, _wave())
    print(f"{layout}: max |ours - transformers| = {diff:.3e} (output scale {scale:.2f})")
    assert scale > 1.0 and diff <= 1e-4


def test_legacy_weight_g_weight_v_keys(hf_model, tmp_path):
    _, model, folder = hf_model
    pos = "encoder.pos_conv_embed.conv"
    tensors = load_safetensors(folder)
    tensors[f"{pos}.weight_g"] = tensors.pop(f"{pos}.parametrizations.weight.original0")
    tensors[f"{pos}.weight_v"] = tensors.pop(f"{pos}.parametrizations.weight.original1")
    save_file(tensors, str(tmp_path / "model.safetensors"))
    shutil.copy(folder / "config.json", tmp_path / "config.json")
    encoder, report = import_wav2vec2(tmp_path / "model.safetensors")
    assert any("weight_g/weight_v" in n for n in report.notes)
    assert _max_diff(encoder, model, _wave(1, seed=3))[0] <= 1e-4


def test_ctc_checkpoint_with_prefix_and_shards(tmp_path):
    """``Wav2Vec2ForCTC``: ``wav2vec2.`` prefix, ``lm_head`` skipped; saved in shards."""
    model = _randomise(_hf().Wav2Vec2ForCTC(_hf_config("large", vocab_size=11)), seed=1)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert list(tmp_path.glob("*.safetensors.index.json"))
    encoder, report = import_wav2vec2(tmp_path)
    note = " ".join(report.notes)
    assert "lm_head.weight" in note and "lm_head.bias" in note and "'wav2vec2.'" in note
    import torch

    wave = _wave(1, seed=4)
    with torch.no_grad():
        ref = model.wav2vec2(torch.from_numpy(wave)).last_hidden_state.numpy()
    assert float(np.abs(np.asarray(encoder(jnp.asarray(wave))) - ref).max()) <= 1e-4


# ----- errors -------------------------------------------------------------------------------

def _rewrite(folder, dst, change):
    tensors = load_safetensors(folder)
    change(tensors)
    dst.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(dst / "model.safetensors"))
    shutil.copy(folder / "config.json", dst / "config.json")
    return dst


def test_one_error_lists_every_offending_key(hf_model, tmp_path):
    _, _, folder = hf_model

    def damage(t):
        del t["encoder.layers.1.attention.k_proj.bias"]
        del t["feature_projection.layer_norm.weight"]
        t["decoder.extra.weight"] = np.zeros((3,), np.float32)
        t["encoder.layers.0.feed_forward.output_dense.weight"] = np.zeros((32, 65), np.float32)

    with pytest.raises(CheckpointMismatchError) as err:
        import_wav2vec2(_rewrite(folder, tmp_path / "bad", damage))
    msg = str(err.value)
    for text in ("encoder.layers.1.attention.k_proj.bias", "feature_projection.layer_norm.weight",
                 "decoder.extra.weight", "encoder.layers.0.feed_forward.output_dense.weight",
                 "expected (32, 64), found (32, 65)", "4 problems"):
        assert text in msg, text
    assert set(err.value.missing) == {"encoder.layers.1.attention.k_proj.bias",
                                      "feature_projection.layer_norm.weight"}
    assert set(err.value.unexpected) == {"decoder.extra.weight"}


def test_config_disagreement_and_bare_file(hf_model, tmp_path):
    layout, _, folder = hf_model
    with pytest.raises(ValueError, match="num_hidden_layers"):
        import_wav2vec2(folder, Wav2Vec2Config(**{**TINY, "num_hidden_layers": 3}))
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folder / "model.safetensors", bare / "w.safetensors")
    with pytest.raises(ValueError, match="pass cfg"):
        import_wav2vec2(bare / "w.safetensors")
    # The other layout's config: the norm keys do not fit, and the error says so.
    other = "large" if layout == "base" else "base"
    norm, stable, bias = LAYOUTS[other]
    with pytest.raises(CheckpointMismatchError, match="conv_layers.1.layer_norm"):
        import_wav2vec2(bare / "w.safetensors", Wav2Vec2Config(
            **TINY, feat_extract_norm=norm, do_stable_layer_norm=stable, conv_bias=bias))
    config = json.loads((folder / "config.json").read_text())
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "config.json").write_text(json.dumps({**config, "add_adapter": True}))
    shutil.copy(folder / "model.safetensors", tmp_path / "adapter" / "model.safetensors")
    with pytest.raises(ValueError, match="add_adapter"):
        import_wav2vec2(tmp_path / "adapter")


# ----- chaining into the DiT's audio features -----------------------------------------------

def test_chain_into_audio_encoder_from_features(imported):
    from flax import nnx

    encoder, _ = imported
    wave = _wave(1, samples=16000)                           # 1 s at 16 kHz
    features = encoder(jnp.asarray(wave))
    # Tiny total stride is 20 (800 fps); the released models' 320 gives encoder.cfg.fps == 50.
    assert features.shape == (1, encoder.cfg.num_frames(16000), 32)
    audio = AudioEncoder(AudioEncoderConfig.tiny(external_dim=encoder.cfg.hidden_size, fps=25.0),
                         rngs=nnx.Rngs(0))
    # wav2vec2 drops the partial frame at the end: pass the video frame count the audio covers.
    tokens = audio.from_features(features, source_fps=encoder.cfg.fps,
                                 num_frames=num_video_frames(16000, fps=25.0))
    assert tokens.shape == (1, 25, audio.cfg.out_dim)
    assert np.isfinite(np.asarray(tokens)).all()
    # At 50 fps (the real models), 49 frames per second of audio also give 25 video frames.
    tokens_50 = audio.from_features(features[:, :49], source_fps=50.0)
    assert tokens_50.shape == (1, 25, audio.cfg.out_dim)


def test_convert_to_orbax_round_trip(hf_model, imported, tmp_path):
    from flax import nnx

    from avatarv_jax.io.convert import convert, load_converted

    _, _, folder = hf_model
    dest = tmp_path / "w2v"
    convert("wav2vec2", folder, dest)
    loaded = load_converted(dest)
    direct, _ = imported
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(direct, nnx.Param)),
                                 nnx.to_flat_state(nnx.state(loaded, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))
