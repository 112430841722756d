"""The AvatarWorld probe: accuracy of the shipped weights on held-out data, and its plumbing."""

import numpy as np
import pytest

from avatarv_jax.data.avatarworld import identity as idn
from avatarv_jax.data.avatarworld import probe as pb
from avatarv_jax.data.avatarworld import probe_train as pt


@pytest.fixture(scope="module")
def probe():
    return pb.load_probe()


# The targets are mouth-opening R^2 >= 0.95 and static attributes >= 98 %. The shipped
# probe meets both on the documented 24-clip held-out table (docs/avatarworld.md, "Probe":
# R^2 0.963, 98.0 %) but not on this smaller set (6 clips: R^2 0.950, 97.1 %; 384 posed frames:
# R^2 0.975, 96.8 %), so these floors sit a little under what it measures here and a regression
# fails; raise them to the targets once a probe meets them on this set too.
MOUTH_R2_FLOOR = 0.94
ATTRIBUTE_FLOOR = 0.96            # mean over all 14 attributes, nose included
ATTRIBUTE_FLOOR_WITHOUT_NOSE = 0.97
NOSE_FLOOR = 0.75                 # the nose was read at chance (~31 %) before it was redrawn


def _mean_without_nose(report):
    acc, frames = report["attribute_accuracy"], report["attribute_frames"]
    names = [n for n in idn.ATTRIBUTE_NAMES if n != "nose"]
    return sum(acc[n] * frames[n] for n in names) / sum(frames[n] for n in names)


def test_shipped_probe_accuracy_on_heldout_people_and_scenes(probe):
    """Held-out identities in held-out scenes: speech clips and random poses."""
    clips = pt.evaluate_clips(probe, num_clips=6, duration_s=2.0, seed=77)
    assert clips["motion_r2"]["mouth_open"] >= MOUTH_R2_FLOOR, clips["motion_r2"]
    assert clips["mean_attribute_accuracy"] >= ATTRIBUTE_FLOOR, clips["attribute_accuracy"]
    assert _mean_without_nose(clips) >= ATTRIBUTE_FLOOR_WITHOUT_NOSE
    assert clips["attribute_accuracy"]["nose"] >= NOSE_FLOOR
    posed = pt.evaluate_posed(probe, num_frames=384, seed=78)
    assert posed["motion_r2"]["mouth_open"] >= MOUTH_R2_FLOOR
    assert posed["motion_r2"]["head_yaw"] >= 0.9 and posed["motion_r2"]["head_pitch"] >= 0.85
    assert posed["mean_attribute_accuracy"] >= ATTRIBUTE_FLOOR, posed["attribute_accuracy"]
    assert _mean_without_nose(posed) >= ATTRIBUTE_FLOOR_WITHOUT_NOSE
    assert posed["attribute_accuracy"]["nose"] >= NOSE_FLOOR
    for name in ("teeth", "mark"):  # the attributes that only some frames show
        assert posed["attribute_frames"][name] > 30
        assert posed["attribute_accuracy"][name] >= 0.85, name


def test_probe_reads_larger_frames_and_clip_level_identity(probe):
    from avatarv_jax.data.avatarworld.clip import make_clip

    clip = make_clip(5, 23, 15, "zh", duration_s=2.0, resolution=128)
    r = probe.read_clip(clip.frames)
    assert r.motion.shape == (clip.num_frames, len(pb.mo.MOTION_FIELDS))
    assert (r.attributes == clip.static_attributes).mean() >= 12 / 14
    np.testing.assert_allclose(np.linalg.norm(r.frame_embeddings, axis=1), 1.0, atol=1e-5)
    assert pt.r2_score(r.motion[:, 0], clip.motion[:, 0]) > 0.8


def test_save_and_load_round_trip(tmp_path):
    net = pb.make_probe_net(channels=(8, 8, 8, 8, 8), hidden=16, seed=3)
    path = str(tmp_path / "p.safetensors")
    pb.save_probe(net, path, meta={"note": "tiny"}, dtype=np.float32)
    loaded = pb.load_probe(path)
    assert loaded.meta == {"note": "tiny"}
    frames = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    a, b = pb.Probe(net).read(frames), loaded.read(frames)
    np.testing.assert_allclose(a.motion, b.motion, atol=1e-6)
    for p, q in zip(a.attribute_probs, b.attribute_probs):
        np.testing.assert_allclose(p, q, atol=1e-6)
    assert len(a.attribute_probs) == idn.NUM_ATTRIBUTES
    assert a.embedding.shape == (3, pb.EMBEDDING_DIM)


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="probe_train"):
        pb.load_probe(str(tmp_path / "missing.safetensors"))
    from safetensors.numpy import save_file

    bad = str(tmp_path / "bad.safetensors")
    save_file({"x": np.zeros(3, np.float32)}, bad)
    with pytest.raises(ValueError, match="does not match ProbeNet"):
        pb.load_probe(bad)


def test_preprocess_sizes():
    frames = np.random.default_rng(0).integers(0, 256, (2, 128, 128, 3), dtype=np.uint8)
    x = np.asarray(pb.preprocess(frames))
    assert x.shape == (2, 64, 64, 3) and -1 <= x.min() and x.max() <= 1
    expect = frames.reshape(2, 64, 2, 64, 2, 3).mean(axis=(2, 4)) / 127.5 - 1
    np.testing.assert_allclose(x, expect, atol=1e-5)
    assert np.asarray(pb.preprocess(frames[:, :96, :96])).shape == (2, 64, 64, 3)
    with pytest.raises(ValueError, match="frames must be"):
        pb.preprocess(frames[0])
