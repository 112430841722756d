"""Rewards on real video: LSE-C in the step (JAX SyncNet chain) and dlib face similarity
(host callback); each ranks the true clip above a corrupted one, and a GRPO step runs on them."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from avatarv_jax.data.ingest.faces import faces_available
from avatarv_jax.eval import frontends as fe
from avatarv_jax.posttrain import real_rewards as rr


def test_jax_mfcc_matches_the_eval_front_end():
    rng = np.random.default_rng(0)
    audio = (0.1 * rng.standard_normal((2, 8000))).astype(np.float32)
    audio[1, 3000:5000] = 0.0                       # silence hits the log floor
    got = np.asarray(jax.jit(rr.mfcc)(jnp.asarray(audio)))
    for i in range(2):
        np.testing.assert_allclose(got[i], fe.mfcc(audio[i]), atol=2e-3, rtol=1e-4)


@pytest.fixture(scope="module")
def talking_clips():
    """Two AvatarWorld people speaking, 1 s at 64 px, with their masks."""
    from avatarv_jax.data.avatarworld.clip import make_clip

    clips = [make_clip(7 + i, i, i, "en", duration_s=1.0, resolution=64) for i in range(2)]
    t = clips[0].num_frames
    frames = np.stack([c.frames for c in clips]).astype(np.float32) / 127.5 - 1.0
    batch = {"audio": np.stack([c.audio[:t * 640] for c in clips]),
             "mask_mouth": np.stack([c.masks["mouth"] for c in clips]),
             "mask_face": np.stack([c.masks["face"] for c in clips])}
    return frames, batch, clips


def test_mouth_boxes_match_the_eval_boxes(talking_clips):
    _, batch, clips = talking_clips
    got = np.asarray(rr.mouth_boxes(jnp.asarray(batch["mask_mouth"]),
                                    jnp.asarray(batch["mask_face"])))
    for i, c in enumerate(clips):
        want = fe.mouth_box_from_masks(c.masks["mouth"], c.masks["face"])
        # the union over frames reaches lower than the eval's median box where the jaw drops
        # (by 0.13 face half-heights at full opening), by up to 2 px at 64 px
        np.testing.assert_allclose(got[i], want, atol=2.5)


def test_lse_c_ranks_synced_audio_above_another_clips_audio(talking_clips):
    frames, batch, _ = talking_clips
    reward = rr.LseCReward()
    score = jax.jit(reward.__call__)
    synced = np.asarray(score(jnp.asarray(frames), batch))
    swapped = np.asarray(score(jnp.asarray(frames), dict(batch, audio=batch["audio"][::-1])))
    assert synced.shape == (2,)
    assert (synced > swapped + 0.05).all(), (synced, swapped)
    assert (synced > 0.25).all(), synced         # eval's LSE-C on these clips: 0.39, 0.43


def test_lse_c_names_what_it_lacks(talking_clips):
    frames, batch, _ = talking_clips
    reward = rr.LseCReward()
    with pytest.raises(ValueError, match=r"lse_c reward needs \['mask_mouth'\]"):
        reward(jnp.asarray(frames), {k: v for k, v in batch.items() if k != "mask_mouth"})
    with pytest.raises(ValueError, match="at least 7 frames"):
        reward(jnp.asarray(frames[:, :5]), batch)
    with pytest.raises(ValueError, match="unknown rewards"):
        from avatarv_jax.posttrain.rewards import check_weights
        check_weights({"lse_d": 1.0})


@pytest.mark.skipif(not faces_available(), reason="needs the `faces` extra (dlib)")
def test_face_similarity_ranks_the_same_face_above_another():
    from skimage import data
    from skimage.transform import resize

    def clip(image, frames=3):
        img = resize(image, (128, 128)) * 2.0 - 1.0
        return np.stack([np.roll(img, 2 * t, axis=1) for t in range(frames)]).astype(np.float32)

    astronaut = clip(data.astronaut())
    other = clip(np.repeat(data.lfw_subset()[0][..., None], 3, -1))   # another real face
    blank = np.zeros_like(astronaut)
    reward = rr.FaceSimilarityReward(frames=3)
    ref = np.stack([astronaut[:1], astronaut[:1], astronaut[:1]])
    gen = np.stack([astronaut[::-1], other, blank])
    got = np.asarray(jax.jit(reward.__call__)(jnp.asarray(gen), jnp.asarray(ref)))
    assert got[0] > 0.95 and 0.0 < got[1] < 0.9, got        # dlib: 0.81 for this pair
    assert got[2] == 0.0                                     # no face found


def _builder(stage, weights):
    from avatarv_jax.testing import posttrain_setup
    from avatarv_jax.training.stage_config import stage_config
    from avatarv_jax.training.synthetic import synthetic_batch

    cfg = stage_config(stage, "tiny")
    cfg[stage].update(group_size=2, sampling_steps=2)
    cfg[stage].reward_weights = weights                  # replaces (update would merge)
    if stage == "grpo":
        cfg.grpo.update(train_steps=1, inner_updates=1)
    cfg.optimizer.ema_decay = 0.0
    builder, state, frozen = posttrain_setup(cfg, 10)
    host = synthetic_batch(0, "sft", batch_size=1, num_frames=9, ref_frames=5, resolution=32,
                           text_len=8)
    return builder, state, frozen, host


def test_grpo_step_runs_on_real_video_rewards():
    """GRPO on the tiny config with lse_c and face_similarity, pixel SFT batches with masks;
    a batch without masks is refused by name."""
    builder, state, frozen, host = _builder("grpo", dict(lse_c=1.0, face_similarity=1.0))
    step = jax.jit(lambda s, b: builder.train_step(s, frozen, b, jax.random.key(0)))
    with pytest.raises(ValueError, match=r"lse_c reward needs \['mask_mouth', 'mask_face'\]"):
        step(state, {k: v for k, v in host.items() if not k.startswith("mask_")})
    _, metrics = step(state, host)
    metrics = jax.device_get(metrics)
    assert float(metrics["finite"]) == 1.0
    assert math.isfinite(float(metrics["loss"]))
    assert float(metrics["reward_lse_c"]) > 0.0            # median - min of distances
    assert float(metrics["reward_face_similarity"]) == 0.0  # noise frames show no face
    assert float(metrics["grad_norm"]) > 0.0               # (step 0 of warmup: lr 0)
    assert "reward_lip_sync" not in metrics                 # unweighted: not computed


@pytest.mark.slow   # tracing the whole auto-DPO step: ~25 s on 2 shared cores
def test_auto_dpo_mixes_probe_and_real_rewards():
    """Traced only (no compile): the probe's lip_sync beside lse_c, each reported."""
    builder, state, frozen, host = _builder("dpo", dict(lip_sync=1.0, lse_c=0.5))
    host["motion"] = np.zeros_like(host["motion"])      # AvatarWorld's 10-d motion
    _, metrics = jax.eval_shape(lambda s, b: builder.train_step(s, frozen, b, jax.random.key(0)),
                                state, host)
    assert {"reward_lip_sync", "reward_lse_c"} <= set(metrics)
    assert "reward_identity" not in metrics                 # unweighted: not computed
