"""VAE pre-training: the loss falls, weights round-trip exactly, mismatches and bad input fail."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from avatarv_jax.io.small_weights import flatten_params
from avatarv_jax.models.vae import CausalVideoVAE, VAEConfig
from avatarv_jax.models.vae import blocks
from avatarv_jax.training import vae_pretrain as vp


def _clips(n=2, t=5, size=16, seed=0):
    """Smooth coloured blobs: structured like faces on a background, cheap to make."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    out = np.empty((n, t, size, size, 3), np.uint8)
    for i in range(n):
        bg, fg = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
        for j in range(t):
            cy, cx = 0.5 + 0.05 * j, rng.uniform(0.3, 0.7)
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.04)[..., None]
            out[i, j] = (bg * (1 - blob) + fg * blob).astype(np.uint8)
    return out


def test_stacked_2d_conv_equals_3d_conv():
    """The CPU path of the causal conv (time taps stacked into channels) is the same maths."""
    x = jax.random.normal(jax.random.key(0), (2, 7, 8, 8, 4))
    for kernel_shape, strides in [((3, 3, 3, 4, 5), (1, 1, 1)), ((3, 1, 1, 4, 4), (2, 1, 1)),
                                  ((1, 1, 1, 4, 3), (1, 1, 1))]:
        k = jax.random.normal(jax.random.key(1), kernel_shape)
        pad = [(0, 0)] + [(s // 2, s // 2) for s in kernel_shape[1:3]]
        want = jax.lax.conv_general_dilated(x, k, strides, pad,
                                            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))
        got = blocks._conv3d_as_2d(x, k, strides, pad)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


def test_loss_terms_match_their_definitions():
    clips = _clips(n=1, t=1)
    vae = CausalVideoVAE(VAEConfig.tiny(), rngs=nnx.Rngs(0))
    video = vp.to_unit(clips)
    total, terms = vp.vae_loss(vae, video, jax.random.key(0), 0.5)
    mean, logvar = vp.posterior(vae, video)
    kl = 0.5 * np.mean(np.square(mean) + np.exp(logvar) - 1.0 - logvar)
    np.testing.assert_allclose(terms["kl"], kl, rtol=1e-5)
    assert float(terms["kl"]) > 0 and float(terms["l1"]) > 0
    np.testing.assert_allclose(total, terms["l1"] + terms["l2"] + 0.5 * terms["kl"], rtol=1e-6)


def test_mouth_weight_counts_mouth_pixels_more_and_mouth_psnr_is_the_masked_one():
    """Weighted loss = mean(|e| w) + mean(e^2 w) + KL, w = 1 + W * mask (same posterior
    sample); the mouth PSNR is the PSNR over the masked pixels alone."""
    clips = _clips(n=1, t=1)
    mask = np.zeros(clips.shape[:-1] + (1,), np.uint8)
    mask[..., 5:9, 6:11, :] = 255
    batch = np.concatenate([clips, mask], -1)
    vae = CausalVideoVAE(VAEConfig.tiny(), rngs=nnx.Rngs(0))
    video, mouth = vp.split_mouth(batch)
    np.testing.assert_array_equal(video, vp.to_unit(clips))
    assert mouth.shape == clips.shape[:-1] + (1,) and float(mouth.sum()) == 20
    key = jax.random.key(0)
    total, terms = vp.vae_loss(vae, video, key, 0.5, mouth, 9.0)
    plain, plain_terms = vp.vae_loss(vae, video, key, 0.5)
    mean, logvar = vp.posterior(vae, video)
    z = mean + np.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    err = np.asarray(vp.decode_raw(vae, z)) - np.asarray(video)
    w = 1.0 + 9.0 * np.asarray(mouth)
    want = np.mean(np.abs(err) * w) + np.mean(err ** 2 * w) + 0.5 * float(terms["kl"])
    np.testing.assert_allclose(total, want, rtol=1e-5)
    np.testing.assert_allclose(terms["l1"], plain_terms["l1"], rtol=1e-6)
    m = np.asarray(mouth)[..., 0] > 0
    np.testing.assert_allclose(terms["mouth_l1"], np.abs(err)[m].mean(), rtol=1e-5)
    assert float(total) > float(plain)

    recon = (np.asarray(vae.decode(vae.encode(video))) + 1) / 2
    mse_mouth = np.mean((recon - clips / 255.0)[m] ** 2)
    assert vp.reconstruction_psnr(vae, batch) == pytest.approx(10 * np.log10(1 / mse_mouth),
                                                               abs=1e-3)


def test_psnr_matches_its_definition_and_input_is_checked():
    clips = _clips(n=1, t=1)
    vae = CausalVideoVAE(VAEConfig.tiny(), rngs=nnx.Rngs(0))
    psnr = vp.reconstruction_psnr(vae, clips)
    mse = np.mean(((np.asarray(vae.decode(vae.encode(vp.to_unit(clips)))) + 1) / 2
                   - clips / 255.0) ** 2)
    assert psnr == pytest.approx(10 * np.log10(1 / mse), abs=1e-3)
    with pytest.raises(ValueError, match=r"\[N, T, H, W, 3\]"):
        vp.reconstruction_psnr(vae, clips[0])


def test_save_load_round_trip_is_bit_identical(tmp_path):
    vae = CausalVideoVAE(VAEConfig.tiny(), rngs=nnx.Rngs(1))
    mean_bias = np.asarray(vae.quant_conv.bias[...][:16])
    vp.start_near_deterministic(vae, -6.0)  # a non-default value must round-trip too
    np.testing.assert_array_equal(vae.quant_conv.bias[...][16:], np.full(16, -6.0, np.float32))
    np.testing.assert_array_equal(vae.quant_conv.bias[...][:16], mean_bias)
    path = str(tmp_path / "vae.safetensors")
    vp.save_pretrained_vae(vae, path, "tiny", {"heldout_psnr": 12.5})
    fresh = CausalVideoVAE(VAEConfig.tiny(), rngs=nnx.Rngs(2))
    assert vp.load_pretrained_vae(path, fresh) is fresh
    want, got = flatten_params(vae), flatten_params(fresh)
    assert set(want) == set(got)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    meta = vp.read_pretrained_meta(path)
    assert meta["preset"] == "tiny" and meta["heldout_psnr"] == 12.5
    assert [p for p in os.listdir(tmp_path)] == ["vae.safetensors"]


def test_load_vae_file_builds_the_stored_config_without_a_preset(tmp_path):
    cfg = VAEConfig.tiny_s4(z_dim=8, dim_mult=(1, 2, 3))     # no preset has this shape
    vae = CausalVideoVAE(cfg, rngs=nnx.Rngs(3))
    path = str(tmp_path / "vae.safetensors")
    vp.save_pretrained_vae(vae, path, "custom", {})
    assert vp.vae_config_of_file(path) == cfg
    loaded = vp.load_vae_file(path)
    want, got = flatten_params(vae), flatten_params(loaded)
    assert set(want) == set(got)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    video = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (1, 5, 16, 16, 3)), jnp.float32)
    np.testing.assert_array_equal(loaded.encode(video), vae.encode(video))
    with pytest.raises(FileNotFoundError, match="do not exist"):
        vp.vae_config_of_file(str(tmp_path / "nope.safetensors"))


def test_load_into_mismatched_config_names_the_parameter(tmp_path):
    path = str(tmp_path / "vae.safetensors")
    vp.save_pretrained_vae(CausalVideoVAE(VAEConfig.tiny(), rngs=nnx.Rngs(0)), path, "tiny", {})
    wider = CausalVideoVAE(VAEConfig.tiny(base_dim=12), rngs=nnx.Rngs(0))
    shape_error = r"decoder\.conv_in\.bias\S* has shape \(16,\), expected \(24,\)"
    with pytest.raises(ValueError, match=shape_error):
        vp.load_pretrained_vae(path, wider)
    deeper = CausalVideoVAE(VAEConfig.tiny(num_res_blocks=2), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"missing \['decoder\.up_blocks"):
        vp.load_pretrained_vae(path, deeper)
    with pytest.raises(FileNotFoundError, match="do not exist"):
        vp.load_pretrained_vae(str(tmp_path / "nope.safetensors"), wider)


def test_fold_latent_statistics_normalises_latents_and_keeps_the_round_trip():
    vae = CausalVideoVAE(VAEConfig.tiny_s4(), rngs=nnx.Rngs(4))
    clips = _clips(n=4, t=9, size=16)
    video = vp.to_unit(clips)
    before_latents = vae.encode(video)
    before_video = vae.decode(before_latents)
    mean, std = vp.latent_moments(vae, clips)
    assert np.abs(mean).max() > 0.05 or np.abs(std - 1).max() > 0.05  # not already normal
    _, _, logvar_before = vae.encode_moments_chunk(vae.init_encode_cache(), video)
    vp.fold_latent_statistics(vae, mean, std)
    after_latents = np.asarray(vae.encode(video), np.float64)
    np.testing.assert_allclose(after_latents, (np.asarray(before_latents) - mean) / std,
                               atol=1e-4)
    flat = after_latents.reshape(-1, 16)
    np.testing.assert_allclose(flat.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(flat.std(0), 1.0, atol=1e-4)
    np.testing.assert_allclose(vae.decode(jnp.asarray(after_latents, jnp.float32)),
                               before_video, atol=1e-4)
    # the posterior std scales with the mean: log-variance shifts by -2 log(std)
    _, _, logvar_after = vae.encode_moments_chunk(vae.init_encode_cache(), video)
    np.testing.assert_allclose(logvar_after, logvar_before - 2 * np.log(std), atol=1e-4)
    with pytest.raises(ValueError, match="need 16 values"):
        vp.fold_latent_statistics(vae, mean[:8], std)
    with pytest.raises(ValueError, match="positive std"):
        vp.fold_latent_statistics(vae, mean, np.zeros(16))


def test_cli_missing_shards_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "vae.safetensors"
    code = vp.main(["--shards", str(tmp_path / "missing"), "--out", str(out), "--steps", "1"])
    assert code == 2
    assert "--shards" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
    code = vp.main(["--shards", str(tmp_path), "--out", str(out), "--frames", "8"])
    assert code == 2
    assert "--frames must be 1 + 4k" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_cli_training_raises_heldout_psnr_and_writes_loadable_weights(tmp_path, capsys):
    """A few CLI steps on a real (tiny) AvatarWorld shard set: PSNR rises, the file loads."""
    from avatarv_jax.data.avatarworld import ShardWriter, make_clip

    shards = tmp_path / "shards"
    writer = ShardWriter(str(shards))
    for i in range(2):
        writer.add(make_clip(seed=i, identity_id=i, scene_id=i, resolution=32, num_frames=5,
                             speech_backend="synthetic"))
    writer.close()
    out = tmp_path / "vae.safetensors"
    code = vp.main(["--shards", str(shards), "--heldout", str(shards), "--out", str(out),
                    "--resolution", "32", "--frames", "5", "--batch", "2", "--steps", "30",
                    "--lr", "3e-3", "--image-fraction", "0", "--eval-every", "30"])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shards", "vae.safetensors"]
    meta = vp.read_pretrained_meta(str(out))
    assert (meta["preset"], meta["steps"], meta["train_clips"]) == ("tiny", 30, 2)
    assert [row["step"] for row in meta["curve"]] == [0, 30]
    before, after = meta["curve"][0]["heldout_psnr"], meta["heldout_psnr"]
    assert after > before + 2.0, meta["curve"]
    assert len(meta["heldout_latents"]["std"]) == 16
    fresh = vp.load_pretrained_vae(str(out), CausalVideoVAE(VAEConfig.tiny(), rngs=nnx.Rngs(3)))
    clips = vp.load_clip_frames(str(shards))
    assert vp.reconstruction_psnr(fresh, clips) == pytest.approx(after, abs=0.01)
    code = vp.main(["--shards", str(shards), "--out", str(out), "--resolution", "64"])
    assert code == 2 and "rendered at 32 px" in capsys.readouterr().err

    # --init fine-tunes from the file: the curve starts where the first run ended.
    tuned = tmp_path / "tuned.safetensors"
    code = vp.main(["--shards", str(shards), "--heldout", str(shards), "--out", str(tuned),
                    "--init", str(out), "--resolution", "32", "--frames", "5", "--batch", "2",
                    "--steps", "2", "--lr", "1e-4", "--eval-every", "2", "--mouth-weight", "5"])
    assert code == 0, capsys.readouterr().err
    tuned_meta = vp.read_pretrained_meta(str(tuned))
    assert (tuned_meta["init"], tuned_meta["mouth_weight"]) == ("vae.safetensors", 5.0)
    assert tuned_meta["curve"][0]["heldout_psnr"] == pytest.approx(after, abs=0.01)
    mouth_clips = vp.load_clip_frames(str(shards), with_mouth=True)
    assert mouth_clips.shape[-1] == 4 and set(np.unique(mouth_clips[..., 3])) == {0, 255}
    assert tuned_meta["curve"][0]["heldout_mouth_psnr"] == pytest.approx(
        vp.reconstruction_psnr(fresh, mouth_clips), abs=0.01)
    # --steps 0 --normalize-latents converts a file: same reconstruction, unit latents.
    folded = tmp_path / "folded.safetensors"
    code = vp.main(["--shards", str(shards), "--heldout", str(shards), "--out", str(folded),
                    "--init", str(out), "--resolution", "32", "--frames", "5", "--steps", "0",
                    "--normalize-latents"])
    assert code == 0, capsys.readouterr().err
    folded_meta = vp.read_pretrained_meta(str(folded))
    assert folded_meta["latents_folded"]["std"] == meta["heldout_latents"]["std"]
    np.testing.assert_allclose(folded_meta["heldout_latents"]["mean"], 0.0, atol=1e-3)
    np.testing.assert_allclose(folded_meta["heldout_latents"]["std"], 1.0, atol=1e-3)
    assert vp.reconstruction_psnr(vp.load_vae_file(str(folded)), clips) == pytest.approx(
        after, abs=0.01)
    code = vp.main(["--shards", str(shards), "--out", str(tmp_path / "x.safetensors"),
                    "--resolution", "32", "--frames", "5", "--steps", "0"])
    assert code == 2 and "0 steps only with --init" in capsys.readouterr().err
    for bad, message in ((tmp_path / "none.safetensors", "is not a file"),
                         (shards / "manifest.json", "not a readable safetensors file")):
        code = vp.main(["--shards", str(shards), "--out", str(tmp_path / "x.safetensors"),
                        "--init", str(bad), "--resolution", "32", "--frames", "5"])
        assert code == 2 and message in capsys.readouterr().err
        assert not (tmp_path / "x.safetensors").exists()


def test_trainer_init_vae_loads_the_file_into_the_frozen_vae(tmp_path):
    """``init_vae``: the run's frozen VAE (saved in the checkpoint) is the file's, bit for
    bit; a missing file is a clear error before any work."""
    import orbax.checkpoint as ocp

    from avatarv_jax.training.checkpoints import resolve_step_dir
    from avatarv_jax.training.stage_config import stage_config
    from avatarv_jax.training.surgery import _flat
    from avatarv_jax.training.synthetic import synthetic_dataset
    from avatarv_jax.training.trainer import train

    vae = CausalVideoVAE(VAEConfig.tiny(), rngs=nnx.Rngs(11))
    path = str(tmp_path / "vae.safetensors")
    vp.save_pretrained_vae(vae, path, "tiny", {"steps": 0})
    cfg = stage_config("t2v", "tiny")
    cfg.train.num_steps = 1
    cfg.train.progress_bar = False
    cfg.data.batch_size = 2
    cfg.init_vae = str(tmp_path / "missing.safetensors")
    data = lambda: synthetic_dataset("t2v", num_batches=1, batch_size=2, num_frames=5,
                                     ref_frames=1, resolution=32, text_len=8,
                                     latent_shape=(4, 4, 16))
    with pytest.raises(FileNotFoundError, match="init_vae"):
        train(cfg, tmp_path / "bad", data=data())
    cfg.init_vae = path
    train(cfg, tmp_path / "w", data=data())
    saved = ocp.StandardCheckpointer().restore(resolve_step_dir(tmp_path / "w") / "frozen")
    got = _flat(saved["vae"])
    want = _flat(nnx.to_pure_dict(nnx.state(vae, nnx.Param)))
    assert set(got) == set(want) and want
    for name, value in want.items():
        np.testing.assert_array_equal(np.asarray(got[name]), np.asarray(value), err_msg=name)
