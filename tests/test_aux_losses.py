"""Stage 3's auxiliary losses: the probe's reading of the decoded clean-video estimate.

A stand-in decoder (each latent frame *is* an RGB frame, repeated over the video frames it
covers) keeps the VAE out, so the tests see exactly what the probe reads.
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from avatarv_jax.data.avatarworld import motion as mo
from avatarv_jax.data.avatarworld.clip import make_clip
from avatarv_jax.diffusion.guidance import ConditionDropout
from avatarv_jax.diffusion.objective import TrainBatch, flow_matching_loss
from avatarv_jax.posttrain.rewards import ProbeRewards
from avatarv_jax.training.aux_losses import ProbeAuxLosses, check_aux_config, video_frame_mask

MOUTH = mo.MOTION_FIELDS.index("mouth_open")


def decode(latents):
    """[B, F, 64, 64, 3] -> [B, 1 + 4(F-1), 64, 64, 3]: the causal VAE's frame grouping."""
    return jnp.concatenate([latents[:, :1], jnp.repeat(latents[:, 1:], 4, axis=1)], axis=1)


def to_uint8(frames):
    return np.asarray(jnp.round((frames + 1.0) * 127.5)).clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def world():
    """Latent frames of an open and of a closed mouth (same person), and another person."""
    clip = make_clip(4, 3, 2, "en", duration_s=4.0, resolution=64)
    opening = mo.field(clip.motion, "mouth_open")
    order = np.argsort(opening)
    pixels = clip.frames.astype(np.float32) / 127.5 - 1.0
    closed = pixels[order[:3]][None]                       # [1, 3, 64, 64, 3]
    wide = pixels[order[-3:]][None]
    other = make_clip(9, 17, 5, "en", duration_s=0.4, resolution=64)
    stranger = (other.frames[:3].astype(np.float32) / 127.5 - 1.0)[None]
    assert opening[order[-3:]].min() - opening[order[:3]].max() > 0.3
    return {"closed": jnp.asarray(closed), "wide": jnp.asarray(wide),
            "stranger": jnp.asarray(stranger), "motion": clip.motion}, ProbeRewards()


def _aux(world, weights, *, batch_size=1, ref=None, max_sigma=0.5):
    """The losses for AvatarWorld batches of ``batch_size``; each call names its clean latents
    (their decoding is the lip target); ``ref`` latents are decoded into the pixel reference."""
    batch = {"motion": np.zeros((batch_size, 9, mo.MOTION_DIM), np.float32)}
    if ref is not None:
        batch["ref_video"] = to_uint8(decode(ref))
    return ProbeAuxLosses(weights, max_sigma, decode, batch, probe=world[1])


def test_video_frame_mask_follows_the_causal_grouping():
    out = video_frame_mask(jnp.asarray([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]]))
    np.testing.assert_array_equal(out, [[0, 1, 1, 1, 1, 1, 1, 1, 1],
                                        [1, 0, 0, 0, 0, 1, 1, 1, 1]])


def test_lip_sync_is_zero_on_the_truth_and_large_on_the_wrong_mouth(world):
    lat = world[0]
    aux = _aux(world, {"lip_sync": 1.0})
    sigma, mask = jnp.asarray([0.2]), jnp.asarray([[0.0, 1.0, 1.0]])
    right, terms = aux(lat["wide"], sigma, mask, lat["wide"], None)
    wrong, _ = aux(lat["closed"], sigma, mask, lat["wide"], None)
    assert float(right) < 2e-3 and float(wrong) > 0.05 and float(wrong) > 20 * float(right)
    assert float(terms["aux_fraction"]) == 1.0


def test_lip_sync_gradient_reaches_only_the_noisy_frames(world):
    lat = world[0]
    aux = _aux(world, {"lip_sync": 1.0})
    mask = jnp.asarray([[0.0, 1.0, 1.0]])
    grad = jax.grad(lambda x: aux(x, jnp.asarray([0.2]), mask, lat["wide"], None)[0])(
        lat["closed"])
    per_frame = np.abs(np.asarray(grad)).sum(axis=(0, 2, 3, 4))
    assert np.isfinite(grad).all()
    assert per_frame[0] == 0.0 and per_frame[1] > 0 and per_frame[2] > 0


def test_only_samples_at_low_noise_count(world):
    lat = world[0]
    two = {k: jnp.concatenate([v, v]) for k, v in lat.items() if k != "motion"}
    aux = _aux(world, {"lip_sync": 1.0}, batch_size=2)
    mask = jnp.ones((2, 3))
    est = jnp.concatenate([lat["closed"], lat["wide"]])
    both, _ = aux(est, jnp.asarray([0.2, 0.3]), mask, two["wide"], None)
    first, t = aux(est, jnp.asarray([0.2, 0.9]), mask, two["wide"], None)
    none, t_none = aux(est, jnp.asarray([0.8, 0.9]), mask, two["wide"], None)
    assert float(first) == pytest.approx(2 * float(both), rel=1e-4)   # the wrong one alone
    assert float(t["aux_fraction"]) == 0.5
    assert float(none) == 0.0 and float(t_none["aux_fraction"]) == 0.0


def test_identity_prefers_the_reference_person(world):
    lat = world[0]
    aux = _aux(world, {"identity": 1.0}, ref=lat["closed"])
    sigma, mask = jnp.asarray([0.1]), jnp.asarray([[0.0, 1.0, 1.0]])
    same, terms = aux(lat["wide"], sigma, mask, lat["wide"], None)
    other, _ = aux(lat["stranger"], sigma, mask, lat["wide"], None)
    assert "aux_lip_sync" not in terms
    assert 0.0 <= float(same) < float(other)
    assert float(other) - float(same) > 0.05


def test_bad_configs_and_batches_are_named(world):
    with pytest.raises(ValueError, match=">= 0"):
        check_aux_config(ml_collections.ConfigDict(dict(lip_sync_weight=-1.0, max_sigma=0.5)))
    with pytest.raises(ValueError, match="max_sigma"):
        check_aux_config(ml_collections.ConfigDict(dict(lip_sync_weight=1.0, max_sigma=0.0)))
    assert check_aux_config(ml_collections.ConfigDict(
        dict(lip_sync_weight=2.0, identity_weight=0.0, max_sigma=0.5))) == {"lip_sync": 2.0}
    assert check_aux_config(None) == {}
    real_video = {"video": np.zeros((1, 9, 64, 64, 3), np.uint8),
                  "motion": np.zeros((1, 9, 13), np.float32)}
    with pytest.raises(ValueError, match="AvatarWorld.*13"):
        ProbeAuxLosses({"lip_sync": 1.0}, 0.5, decode, real_video, probe=world[1])
    with pytest.raises(ValueError, match="unknown aux losses"):
        ProbeAuxLosses({"lpips": 1.0}, 0.5, decode, real_video, probe=world[1])


def test_flow_loss_hands_the_clean_estimate_to_the_aux_losses():
    """x0 = x_t - sigma v reaches aux_fn, the prefix frame as the clean latents, and its loss
    is added to the total."""
    from avatarv_jax.models.dit import DiT
    from avatarv_jax.testing import tiny_dit_config
    cfg = tiny_dit_config()
    dit = DiT(cfg, rngs=__import__("flax").nnx.Rngs(0))
    b, f = 2, 3
    lat = jax.random.normal(jax.random.key(1), (b, f, 4, 4, cfg.in_channels))
    batch = TrainBatch(latents=lat, text=jnp.zeros((b, 4, cfg.text_dim)))
    flow = ml_collections.ConfigDict(dict(logit_mean=0.0, logit_std=1.0, shift=1.0,
                                          face_weight=0.0, mouth_weight=0.0, eye_weight=0.0,
                                          motion_weight=1.0))
    seen = {}

    def aux_fn(x0, sigma, frame_mask, clean, ref):
        seen.update(x0=x0, sigma=sigma, mask=frame_mask, clean=clean)
        return 3.0 * jnp.mean(x0 ** 2), {"aux_probe": jnp.mean(x0 ** 2)}

    keep = ConditionDropout(0.0, 0.0, 0.0, 0.0)
    key = jax.random.key(2)
    plain, _ = flow_matching_loss(dit, batch, key, flow_cfg=flow, dropout=keep, num_prefix=1)
    loss, terms = flow_matching_loss(dit, batch, key, flow_cfg=flow, dropout=keep,
                                     num_prefix=1, aux_fn=aux_fn)
    np.testing.assert_allclose(loss, plain + 3.0 * terms["aux_probe"], rtol=1e-6)
    np.testing.assert_allclose(terms["total"], loss)
    np.testing.assert_allclose(seen["x0"][:, 0], lat[:, 0], atol=1e-6)  # prefix: clean
    np.testing.assert_array_equal(seen["mask"][:, 0], 0.0)
    assert not np.allclose(seen["x0"][:, 1:], lat[:, 1:], atol=1e-2)      # an estimate
    assert seen["sigma"].shape == (b,) and seen["x0"].shape == lat.shape


def test_sft_run_logs_the_aux_losses(tmp_path):
    """train.py's sft stage with both losses on: the step compiles with the VAE decode inside,
    logs each term, and the losses are finite; other stages have no aux section."""
    import json
    import grain
    from avatarv_jax.training.stage_config import stage_config
    from avatarv_jax.training.synthetic import synthetic_batch
    from avatarv_jax.training.trainer import train

    cfg = stage_config("sft", "tiny")
    cfg.aux.update(lip_sync_weight=2.0, identity_weight=1.0, max_sigma=1.0)
    cfg.train.update(num_steps=2, log_every=1, progress_bar=False)
    cfg.checkpoint.update(every_steps=100, async_save=False)

    def batch(i):
        return synthetic_batch(int(i), "sft", batch_size=2, num_frames=5, ref_frames=1,
                               resolution=32, text_len=8)

    train(cfg, tmp_path, data=grain.MapDataset.range(2).map(batch).to_iter_dataset())
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    assert last["aux_fraction"] == 1.0
    assert last["aux_lip_sync"] > 0 and 0 < last["aux_identity"] <= 2
    assert np.isfinite(last["loss"])
    assert last["loss"] == pytest.approx(last["video"] + last["motion"]
                                         + 2.0 * last["aux_lip_sync"]
                                         + 1.0 * last["aux_identity"], rel=1e-5)
    assert "aux" not in stage_config("a2v", "tiny")
