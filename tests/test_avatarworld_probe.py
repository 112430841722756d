"""The AvatarWorld probe: accuracy of the shipped weights on held-out data, and its plumbing."""

import jax
import numpy as np
import pytest
from flax import nnx

from avatarv_jax.data.avatarworld import identity as idn
from avatarv_jax.data.avatarworld import probe as pb
from avatarv_jax.data.avatarworld import probe_train as pt


@pytest.fixture(scope="module")
def probe():
    return pb.load_probe()


# The targets: mouth-opening R^2 >= 0.95 and static attributes >= 98 % on held-out people
# in held-out scenes. The shipped probe meets them on the documented 24-clip table
# (docs/avatarworld.md, "Probe": R^2 0.969, 99.4 %) and on this smaller set (12 clips: R^2 0.965,
# 98.5 %; 384 posed frames: 0.985, 98.9 %), so the test holds the targets. Fewer clips are too
# few: one hard-to-read mouth moves R^2 by 0.01 (8 clips: 0.945).
MOUTH_R2_TARGET = 0.95
ATTRIBUTE_TARGET = 0.98           # mean over all 14 attributes, over the frames that show each
NOSE_FLOOR = 0.9                  # the weakest attribute (read at chance, ~31 %, before the redraw)


def test_shipped_probe_accuracy_on_heldout_people_and_scenes(probe):
    """Held-out identities in held-out scenes: speech clips and random poses."""
    clips = pt.evaluate_clips(probe, num_clips=12, duration_s=2.0, seed=77)
    assert clips["motion_r2"]["mouth_open"] >= MOUTH_R2_TARGET, clips["motion_r2"]
    assert clips["mean_attribute_accuracy"] >= ATTRIBUTE_TARGET, clips["attribute_accuracy"]
    assert clips["attribute_accuracy"]["nose"] >= NOSE_FLOOR
    assert clips["clip_attribute_accuracy"] >= ATTRIBUTE_TARGET
    posed = pt.evaluate_posed(probe, num_frames=384, seed=78)
    assert posed["motion_r2"]["mouth_open"] >= MOUTH_R2_TARGET
    assert posed["motion_r2"]["head_yaw"] >= 0.9 and posed["motion_r2"]["head_pitch"] >= 0.85
    assert posed["mean_attribute_accuracy"] >= ATTRIBUTE_TARGET, posed["attribute_accuracy"]
    assert posed["attribute_accuracy"]["nose"] >= NOSE_FLOOR
    for name in ("teeth", "mark"):  # the attributes that only some frames show
        assert posed["attribute_frames"][name] > 30
        assert posed["attribute_accuracy"][name] >= 0.9, name


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


def test_with_strides_keeps_the_weights():
    net = pb.make_probe_net(strides=(2, 1, 2, 2, 2), seed=4)
    moved = pb.with_strides(net, (1, 2, 2, 2, 2))
    assert moved.strides == (1, 2, 2, 2, 2)
    for a, b in zip(jax.tree.leaves(nnx.state(net, nnx.Param)),
                    jax.tree.leaves(nnx.state(moved, nnx.Param))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    frames = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    assert pb.Probe(moved).read(frames).motion.shape == (2, len(pb.mo.MOTION_FIELDS))
    with pytest.raises(ValueError, match="trunk"):
        pb.with_strides(net, (1, 1, 2, 2, 2))


@pytest.mark.parametrize("argv, message", [
    (["--strides", "2,2"], "five strides"),
    (["--strides", "1,2,x,2,2"], "comma-separated"),
    (["--hires-fraction", "1.5"], "hires-fraction"),
])
def test_probe_train_cli_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        pt.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
