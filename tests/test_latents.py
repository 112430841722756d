"""Latent pre-encoding: records equal the VAE's encoding, the CLI, and latent-mode pipelines."""

import json
import os
import re

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from avatarv_jax.config import get_model_config
from avatarv_jax.data import latents as lt
from avatarv_jax.data.avatarworld import AvatarWorldDataset, ShardWriter, make_clip
from avatarv_jax.data.pipelines import default_data_config, make_pipeline
from avatarv_jax.data.pipelines.sources import RecordReader, ShardSet
from avatarv_jax.data.pipelines.transforms import crop_resize_video

WINDOW, RES = 9, 32


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
    """4 people x 2 clips of 13 frames at 64 px, encoded through the CLI at 32 px."""
    root = tmp_path_factory.mktemp("latents")
    writer = ShardWriter(str(root / "aw"), clips_per_shard=5)
    for k in range(8):
        writer.add(make_clip(k, identity_id=4 * (k // 2), scene_id=3 * k + 2, num_frames=13,
                             resolution=64, speech_backend="synthetic"))
    writer.close()
    rc = lt.main(["--config", "configs/tiny.py", "--shards", str(root / "aw"), "--dest",
                  str(root / "lat"), "--frames", str(WINDOW), "--stride", "4", "--resolution",
                  str(RES), "--batch", "4", "--clips_per_shard", "7", "--random_init_seed", "0"])
    assert rc == 0
    ds = AvatarWorldDataset(str(root / "aw"))
    clips = list(ds)
    ds.close()
    vae = lt.load_vae(get_model_config("tiny"), checkpoint=None, vae_weights=None,
                      random_init_seed=0)              # the CLI's weights
    return root, clips, vae


def vae_encode(vae, frames):
    return np.asarray(nnx.jit(lambda m, x: m.encode(x))(vae, jnp.asarray(frames, jnp.float32)
                                                         / 127.5 - 1.0))


def read_all(directory):
    shards = ShardSet(directory)
    reader = RecordReader(shards.paths)
    keys = ["latents", "audio", "motion", "mask_face", "caption", "identity_id", "clip_index",
            "start"]
    return shards, [reader.read(i, keys) for i in range(shards.num_records)]


def test_records_are_the_vae_encoding_of_each_window(encoded):
    root, clips, vae = encoded
    shards, records = read_all(str(root / "lat"))
    m = shards.manifest
    assert m["format"] == "avatarv-latents" and m["window_frames"] == WINDOW
    assert m["num_records"] == 16 and [w["start"] for w in m["windows"][:2]] == [0, 4]
    assert m["latent_shape"] == [3, RES // 8, RES // 8, 16]
    assert len(m["source_clips"]) == 8 and "face_embedding" in m["source_clips"][0]
    windows = np.stack([crop_resize_video(clips[w["clip"]].frames[w["start"]:w["start"] + WINDOW],
                                          (0, 0, 64), RES) for w in m["windows"]])
    expected = vae_encode(vae, windows)                  # all windows in one call
    for w, rec, z in zip(m["windows"], records, expected):
        clip, s = clips[w["clip"]], w["start"]
        assert int(rec["clip_index"]) == w["clip"] and int(rec["start"]) == s
        np.testing.assert_allclose(rec["latents"], z, atol=1e-5)
        np.testing.assert_array_equal(rec["audio"], clip.audio[s * 640:(s + WINDOW) * 640])
        np.testing.assert_array_equal(rec["motion"], clip.motion[s:s + WINDOW])
        assert rec["mask_face"].shape == (WINDOW, RES, RES)
        assert str(rec["caption"]) == clip.caption and int(rec["identity_id"]) == clip.identity_id


def test_window_prefixes_are_the_latents_of_shorter_windows(encoded):
    """What latent mode relies on for references and shorter targets: causality."""
    root, clips, vae = encoded
    _, records = read_all(str(root / "lat"))
    frames = crop_resize_video(clips[0].frames[:WINDOW], (0, 0, 64), RES)[None]
    np.testing.assert_allclose(records[0]["latents"][:2], vae_encode(vae, frames[:, :5])[0],
                               atol=1e-5)
    np.testing.assert_allclose(records[0]["latents"][:1], vae_encode(vae, frames[:, :1])[0],
                               atol=1e-5)


@pytest.mark.parametrize("stage", ["t2v", "a2v", "sft"])
def test_latent_mode_batches(encoded, stage):
    root, _, _ = encoded
    _, records = read_all(str(root / "lat"))
    cfg = default_data_config()
    cfg.update(dict(latent_shards=str(root / "lat"), batch_size=2, frames=WINDOW, ref_frames=5,
                    text_length=8))
    batch = next(iter(make_pipeline(cfg, stage, seed=0)))
    assert "video" not in batch and batch["latents"].shape == (2, 3, 4, 4, 16)
    assert batch["latents"].dtype == np.float32

    def which(latents):
        return [i for i, r in enumerate(records) if np.array_equal(r["latents"][:len(latents)],
                                                                   latents)]

    for b in range(2):
        (w,) = which(batch["latents"][b])
        rec = records[w]
        assert batch["identity_id"][b] == int(rec["identity_id"])
        if stage == "t2v":
            continue
        np.testing.assert_array_equal(batch["audio"][b], rec["audio"])
        refs = which(batch["ref_latents"][b])
        if stage == "a2v":
            assert batch["ref_latents"].shape == (2, 1, 4, 4, 16)
            assert any(int(records[r]["clip_index"]) == int(rec["clip_index"]) for r in refs)
            continue
        assert batch["ref_latents"].shape == (2, 2, 4, 4, 16)
        assert batch["mask_face"].shape == (2, WINDOW, RES, RES)
        np.testing.assert_array_equal(batch["motion"][b], rec["motion"])
        (r,) = refs
        ref = records[r]
        assert int(ref["clip_index"]) != int(rec["clip_index"])
        assert int(ref["identity_id"]) == int(rec["identity_id"])
        np.testing.assert_array_equal(batch["ref_motion"][b], ref["motion"][:5])
        np.testing.assert_array_equal(batch["ref_audio"][b], ref["audio"][:5 * 640])


def test_latent_mode_refuses_longer_windows(encoded):
    root, _, _ = encoded
    cfg = default_data_config()
    cfg.update(dict(latent_shards=str(root / "lat"), batch_size=2, frames=13))
    with pytest.raises(ValueError, match="9-frame windows"):
        make_pipeline(cfg, "t2v", seed=0)
    cfg.update(dict(frames=9, resolution=64))
    with pytest.raises(ValueError, match="latents of 32 px frames; data.resolution is 64"):
        make_pipeline(cfg, "t2v", seed=0)


@pytest.mark.parametrize("args, message", [
    (["--frames", "8", "--random_init_seed", "0"], "1 \\+ 4k"),
    (["--random_init_seed", "0", "--vae_weights", "x"], "exactly one"),
    (["--frames", "9"], "exactly one"),
    (["--random_init_seed", "0", "--resolution", "30"], "multiple of 8"),
    (["--random_init_seed", "0", "--frames", "17"], "no clip .* has 17 frames"),
])
def test_cli_bad_input_exits_2_and_leaves_nothing(encoded, tmp_path, capsys, args, message):
    root, _, _ = encoded
    dest = tmp_path / "out"
    rc = lt.main(["--config", "configs/tiny.py", "--shards", str(root / "aw"), "--dest",
                  str(dest), *args])
    assert rc == 2
    assert re.search(message, capsys.readouterr().err)
    assert os.listdir(tmp_path) == []


def test_cli_refuses_an_existing_destination(encoded, capsys):
    root, _, _ = encoded
    before = json.loads((root / "lat" / "manifest.json").read_text())
    rc = lt.main(["--config", "configs/tiny.py", "--shards", str(root / "aw"), "--dest",
                  str(root / "lat"), "--frames", "9", "--random_init_seed", "1"])
    assert rc == 2 and "exists" in capsys.readouterr().err
    assert json.loads((root / "lat" / "manifest.json").read_text()) == before
