"""Real-video ingestion on footage with a known answer: a photo of a face filmed along a path.

The face tests need the `faces` extra (dlib) and scikit-image (the astronaut photo); the Beam
test needs the `data-engine` extra. All footage is 160 px and 0.6-2.3 s long.
"""

import json
import os
import shutil

import numpy as np
import pytest

from avatarv_jax.data.ingest import filters, landmark_motion, masks, scenes, video
from avatarv_jax.data.ingest.config import SAMPLES_PER_FRAME, IngestConfig
from avatarv_jax.data.ingest.faces import faces_available

needs_faces = pytest.mark.skipif(
    not faces_available(),
    reason="needs the `faces` extra (dlib-bin, face_recognition_models, setuptools<81)")

CFG = IngestConfig(longest_side=160)
SIZE = 160
GOOD_FRAMES = 40


# ---- footage ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def footage(tmp_path_factory):
    """A directory of test videos, and the ground truth of the good one."""
    skdata = pytest.importorskip("skimage.data", reason="scikit-image makes the test footage")
    from avatarv_jax.data.ingest import sample_footage as sf

    root = tmp_path_factory.mktemp("footage")
    src = root / "videos"
    src.mkdir()
    astronaut = skdata.astronaut()
    path = sf.camera_path(GOOD_FRAMES)
    good = sf.render_path(astronaut, path, SIZE)
    speech = sf.speech_track(GOOD_FRAMES)
    sf.write_footage(str(src / "good.mp4"), good, speech)
    with open(src / "good.txt", "w") as f:
        f.write("an astronaut in front of a flag\n")
    # a hard cut from the astronaut to a cat (a shot without a face)
    cat = sf.render_path(skdata.chelsea(), np.array([[225.0, 150.0, 290.0]] * 25), SIZE)
    cut = np.concatenate([good[:32], cat])
    sf.write_footage(str(src / "cut.mp4"), cut, sf.speech_track(len(cut), seed=1))
    # the same face in another scene: the photo outside an ellipse round the head replaced
    from skimage.transform import resize
    coffee = (resize(skdata.coffee(), (512, 512), anti_aliasing=True) * 255).astype(np.uint8)
    yy, xx = np.mgrid[:512, :512]
    head = ((xx - 222) / 75.0) ** 2 + ((yy - 130) / 95.0) ** 2 <= 1
    other = sf.render_path(np.where(head[..., None], astronaut, coffee), path, SIZE)
    sf.write_footage(str(src / "other_scene.mp4"), other, sf.speech_track(GOOD_FRAMES, seed=2))
    sf.write_footage(str(src / "dark.mp4"), (good[:30] * 0.12).astype(np.uint8), speech[:30 * 640])
    sf.write_footage(str(src / "static.mp4"), np.repeat(good[:1], 30, 0), speech[:30 * 640])
    sf.write_footage(str(src / "short.mp4"), good[:15], speech[:15 * 640])
    sf.write_footage(str(src / "silent.mp4"), good[:30], None)
    sf.write_footage(str(src / "choppy.mp4"), good[::3][:14], speech[:14 * 1600], fps=10)
    half = sf.render_path(astronaut, path[:30] * [1, 1, 0.8], SIZE)[:, :, 40:120]
    sf.write_footage(str(src / "two_faces.mp4"), np.concatenate([half, half[:, :, ::-1]], 2),
                     speech[:30 * 640])
    data = (src / "good.mp4").read_bytes()
    (src / "sub").mkdir()
    (src / "sub" / "good_copy.mp4").write_bytes(data)
    (src / "truncated.mp4").write_bytes(data[:len(data) // 2])       # index (moov) lost
    sf.remux_faststart(str(src / "silent.mp4"), str(root / "faststart.mp4"))
    front = (root / "faststart.mp4").read_bytes()                   # index first: half decodes
    (src / "truncated_faststart.mp4").write_bytes(front[:len(front) // 2])
    (src / "noise.webm").write_bytes(np.random.default_rng(0).bytes(20000))
    return {"dir": str(src), "root": root, "frames": good, "audio": speech,
            "boxes": sf.map_box(sf.ASTRONAUT_FACE_BOX, path, SIZE), "path": path}


@pytest.fixture(scope="module")
def ingested(footage):
    from avatarv_jax.data.ingest.plain import ingest_plain

    out = str(footage["root"] / "out")
    logs = []
    manifest = ingest_plain(footage["dir"], out, CFG, log=logs.append)
    return {"out": out, "manifest": manifest, "logs": logs}


# ---- decoding --------------------------------------------------------------------------------

def test_output_size_keeps_aspect_and_rounds():
    assert video.output_size(1080, 1920, 256, 16) == (144, 256)
    assert video.output_size(1920, 1080, 160, 16) == (160, 96)
    assert video.output_size(500, 500, 128, 16) == (128, 128)
    with pytest.raises(ValueError, match="bad frame size"):
        video.output_size(0, 10, 128, 16)


def test_decode_gives_25fps_frames_and_aligned_audio(footage):
    out = video.decode(os.path.join(footage["dir"], "good.mp4"), CFG)
    assert out.frames.shape == (GOOD_FRAMES, SIZE, SIZE, 3) and out.frames.dtype == np.uint8
    assert out.audio.shape == (GOOD_FRAMES * SAMPLES_PER_FRAME,) and out.audio.dtype == np.float32
    assert out.has_audio and out.source_fps == 25.0
    assert np.abs(out.frames.astype(np.float32) - footage["frames"]).mean() < 5.0  # H.264 loss
    assert np.corrcoef(out.audio, footage["audio"])[0, 1] > 0.99   # AAC, no offset


def test_decode_repeats_frames_of_a_10fps_source(footage):
    out = video.decode(os.path.join(footage["dir"], "choppy.mp4"), CFG)
    assert out.source_fps == 10.0
    assert out.num_frames == 35                        # 14 frames of 0.1 s at 25 fps
    d = scenes.frame_differences(out.frames)
    assert filters.duplicate_fraction(d, CFG.duplicate_threshold) > 0.5


@pytest.mark.parametrize("name, error", [
    ("truncated.mp4", "cannot decode"), ("noise.webm", "cannot decode"),
    ("truncated_faststart.mp4", r"truncated: decoded 0\.\d+ s of the 1\.20 s")])
def test_decode_refuses_broken_files(footage, name, error):
    with pytest.raises(video.CorruptVideoError, match=error):
        video.decode(os.path.join(footage["dir"], name), CFG)


def test_scene_cut_found_exactly(footage):
    out = video.decode(os.path.join(footage["dir"], "cut.mp4"), CFG)
    d = scenes.frame_differences(out.frames)
    cuts = scenes.find_cuts(d, CFG.cut_threshold, CFG.cut_ratio)
    np.testing.assert_array_equal(cuts, [32])          # the pan and zoom are not cuts
    assert scenes.split_scenes(out.num_frames, cuts) == [(0, 32), (32, 57)]


# ---- motion vector and masks (no dlib needed) -------------------------------------------------

def _random_face(rng):
    lm = rng.uniform(-0.4, 0.4, (68, 2))
    lm[36:42] += [-0.5, 0.0]                           # the subject's right eye, image left
    lm[42:48] += [0.5, 0.0]
    return lm * 30 + [80, 70]


def test_motion_shape_fields_ignore_similarity_transforms():
    rng = np.random.default_rng(0)
    lm = _random_face(rng)
    angle, scale, shift = 0.3, 1.4, np.array([7.0, -5.0])
    rot = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    centre = lm.mean(0)
    moved = (lm - centre) @ rot.T * scale + centre + shift
    a, b = landmark_motion.motion_from_landmarks(np.stack([lm, moved]), (160, 160))
    f = landmark_motion.REAL_MOTION_FIELDS
    shape = [f.index(n) for n in ("mouth_open", "mouth_width", "smile", "eye_open_right",
                                  "eye_open_left", "brow_right", "brow_left", "head_pitch")]
    np.testing.assert_allclose(b[shape], a[shape], rtol=1e-4, atol=1e-5)
    assert b[f.index("head_roll")] - a[f.index("head_roll")] == pytest.approx(angle, abs=1e-5)
    assert b[f.index("face_scale")] / a[f.index("face_scale")] == pytest.approx(scale, rel=1e-5)
    assert landmark_motion.REAL_MOTION_DIM == 13 == a.shape[0]


def test_mouth_open_measures_the_lip_gap():
    rng = np.random.default_rng(1)
    lm = _random_face(rng)
    lm[60:68, 1] = 100.0
    lm[42:48, 1] += lm[36:42, 1].mean() - lm[42:48, 1].mean()   # level eyes: no roll
    opened = lm.copy()
    opened[65:68, 1] += 6.0                            # the lower inner lip drops 6 px
    m = landmark_motion.motion_from_landmarks(np.stack([lm, opened]), (160, 160))
    iod = np.linalg.norm(lm[42:48].mean(0) - lm[36:42].mean(0))
    assert m[0, 0] == pytest.approx(0.0, abs=1e-6)
    assert m[1, 0] == pytest.approx(6.0 / iod, rel=1e-5)
    np.testing.assert_allclose(m[:, 9], 0.0, atol=1e-7)


def test_fill_convex_counts_pixel_centres():
    sq = np.array([[10.0, 20.0], [30.0, 20.0], [30.0, 25.0], [10.0, 25.0]])
    m = masks.fill_convex(sq, 64, 64)
    assert m.sum() == 20 * 5 and m[20:25, 10:30].all()
    assert not masks.fill_convex(np.array([[1.0, 1.0], [5.0, 5.0], [9.0, 9.0]]), 16, 16).any()


def test_motion_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\[T, 68, 2\]"):
        landmark_motion.motion_from_landmarks(np.zeros((3, 5, 2)), (16, 16))


# ---- face track ------------------------------------------------------------------------------

@needs_faces
def test_face_track_landmarks_masks_follow_the_camera_path(footage):
    from avatarv_jax.data.ingest import faces

    frames = video.decode(os.path.join(footage["dir"], "good.mp4"), CFG).frames
    models = faces.shared_models()
    track = faces.track_faces(frames, models, CFG)
    truth = footage["boxes"]
    assert track.present.all() and track.runs() == [(0, GOOD_FRAMES)]
    centre = lambda b: np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], 1)
    size = lambda b: np.sqrt((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1]))
    err = np.linalg.norm(centre(track.boxes) - centre(truth), axis=1)
    assert err.max() < 6.0, err                        # pixels, faces are 45-60 px wide
    ratio = size(track.boxes) / size(truth)
    assert 0.8 < ratio.min() and ratio.max() < 1.25

    lm = faces.track_landmarks(frames, track.boxes, models)
    assert lm.shape == (GOOD_FRAMES, 68, 2)
    pad = 0.25 * size(truth)[:, None]
    inside = ((lm[..., 0] > truth[:, :1] - pad) & (lm[..., 0] < truth[:, 2:3] + pad)
              & (lm[..., 1] > truth[:, 1:2] - pad) & (lm[..., 1] < truth[:, 3:4] + pad))
    assert inside.all()

    motion = landmark_motion.motion_from_landmarks(lm, (SIZE, SIZE))
    assert motion.shape == (GOOD_FRAMES, 13) and np.isfinite(motion).all()
    f = landmark_motion.REAL_MOTION_FIELDS
    true_x = centre(truth)[:, 0] / SIZE * 2 - 1
    assert np.corrcoef(motion[:, f.index("face_x")], true_x)[0, 1] > 0.98
    # the zoom (face 43 -> 58 px) is followed by the landmark-based scale
    assert np.corrcoef(motion[:, f.index("face_scale")], size(truth))[0, 1] > 0.95
    assert np.abs(motion[:, f.index("head_roll")]).max() < 0.3     # the photo is upright

    reg = masks.region_masks(lm, (SIZE, SIZE))
    for t in (0, GOOD_FRAMES // 2, GOOD_FRAMES - 1):
        x0, y0, x1, y1 = truth[t]
        box = np.zeros((SIZE, SIZE), bool)
        box[int(y0):int(y1), int(x0):int(x1)] = True
        face = reg["face"][t]
        assert (face & box).sum() / (face | box).sum() > 0.5       # IoU with the true face box
        assert reg["mouth"][t].any() and reg["eyes"][t].any()
        assert not (reg["mouth"][t] & ~face).any() and not (reg["eyes"][t] & ~face).any()
        my = np.nonzero(reg["mouth"][t])[0].mean()
        ey = np.nonzero(reg["eyes"][t])[0].mean()
        assert y0 + 0.55 * (y1 - y0) < my < y1 and y0 < ey < y0 + 0.55 * (y1 - y0)

    emb = faces.track_embedding(frames, track.boxes, models, 4)
    assert emb.shape == (128,) and np.isfinite(emb).all()


# ---- the whole directory ---------------------------------------------------------------------

@needs_faces
def test_ingest_counts_filters_failures_and_duplicates(ingested):
    m = ingested["manifest"]
    report = m["report"]
    assert sorted(f["source"] for f in report["failed"]) == \
        ["noise.webm", "truncated.mp4", "truncated_faststart.mp4"]
    assert all(f["error"].startswith(f["source"] + ": ") for f in report["failed"])
    assert report["rejected"] == {"choppy": 1, "no_audio": 1, "no_face": 1, "several_faces": 1,
                                  "static": 1, "too_dark": 1, "too_short": 1}
    assert report["duplicates"] == {"good.mp4": ["sub/good_copy.mp4"]}
    assert report["ok"] == 9 and m["num_sources"] == 12      # 13 files, one a copy
    assert [(c["source"], c["start_frame"], c["num_frames"]) for c in m["clips"]] == \
        [("cut.mp4", 0, 32), ("good.mp4", 0, GOOD_FRAMES), ("other_scene.mp4", 0, GOOD_FRAMES)]
    assert m["clips"][1]["caption"] == "an astronaut in front of a flag"
    assert m["clips"][0]["caption"] == CFG.caption
    assert m["motion_dim"] == 13 and len(m["motion_std"]) == 13
    assert any("] truncated.mp4: cannot decode" in line for line in ingested["logs"])


@needs_faces
def test_ingested_records_follow_the_schema(ingested, footage):
    from avatarv_jax.data.identity_graph import IdentityGraph
    from avatarv_jax.data.ingest.records import IngestedDataset

    ds = IngestedDataset(ingested["out"])
    try:
        assert len(ds) == 3
        r = ds[1]
    finally:
        ds.close()
    t = GOOD_FRAMES
    expect = {"frames": ((t, SIZE, SIZE, 3), np.uint8), "motion": ((t, 13), np.float32),
              "mask_face": ((t, SIZE, SIZE), bool), "mask_mouth": ((t, SIZE, SIZE), bool),
              "mask_eyes": ((t, SIZE, SIZE), bool), "audio": ((t * 640,), np.float32),
              "landmarks": ((t, 68, 2), np.float32), "face_boxes": ((t, 4), np.float32),
              "face_embedding": ((128,), np.float32)}
    for key, (shape, dtype) in expect.items():
        assert r[key].shape == shape and r[key].dtype == dtype, key
    assert r["identity_id"] == -1 and r["source"] == "good.mp4" and r["start_frame"] == 0
    assert np.corrcoef(r["audio"], footage["audio"])[0, 1] > 0.99
    m = ingested["manifest"]
    np.testing.assert_allclose(r["face_embedding"], m["clips"][1]["face_embedding"], rtol=1e-6)
    np.testing.assert_allclose(r["background"], m["clips"][1]["background"], rtol=1e-6)
    # all three clips show the same face: dlib's descriptors agree (distance < 0.6)
    emb = np.asarray([c["face_embedding"] for c in m["clips"]])
    assert np.linalg.norm(emb[:, None] - emb[None], axis=-1).max() < 0.6
    # cut.mp4 and good.mp4 share the photo's background; other_scene.mp4 does not
    graph = IdentityGraph.load(os.path.join(ingested["out"], "identity_graph.npz"))
    assert graph.num_nodes == 3 and m["identity_graph"]["path"] == "identity_graph.npz"
    np.testing.assert_array_equal(graph.edges, [[0, 2], [1, 2]])
    assert graph.background_similarity.max() <= 0.985 < float(
        np.dot(m["clips"][0]["background"], m["clips"][1]["background"]))
    assert graph.num_components == 1 and m["identity_graph"]["num_edges"] == 2


@needs_faces
def test_rerun_skips_done_sources_and_refuses_other_configs(ingested, footage):
    from avatarv_jax.data.ingest.plain import ingest_plain

    out = ingested["out"]
    shard = os.path.join(out, ingested["manifest"]["shards"][0]["path"])
    before = os.stat(shard).st_mtime_ns
    logs = []
    again = ingest_plain(footage["dir"], out, CFG, log=logs.append)
    assert again["report"]["skipped_as_done"] == 12 and len(logs) == 12
    assert all("skipped" in line for line in logs)
    assert os.stat(shard).st_mtime_ns == before
    assert again["clips"] == ingested["manifest"]["clips"]
    assert again["report"]["failed"] == ingested["manifest"]["report"]["failed"]
    with pytest.raises(ValueError, match="longest_side"):
        ingest_plain(footage["dir"], out, IngestConfig(longest_side=128), log=logs.append)
    assert not [n for n in os.listdir(out) if ".partial-" in n]


def test_cli_exits_2_on_bad_input(tmp_path, capsys):
    from avatarv_jax.data.ingest.__main__ import main

    assert main(["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["--input", str(tmp_path), "--output", str(tmp_path / "o"), "--bogus", "1"])
    assert e.value.code == 2
    assert main(["--input", str(tmp_path), "--output", str(tmp_path / "o"),
                 "--longest_side", "100"]) == 2       # not a multiple of 16


@needs_faces
def test_cli_runs_the_plain_runner(footage, tmp_path, capsys):
    from avatarv_jax.data.ingest.__main__ import main

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(os.path.join(footage["dir"], "good.mp4"), src)
    shutil.copy(os.path.join(footage["dir"], "noise.webm"), src)
    assert main(["--input", str(src), "--output", str(tmp_path / "out"),
                 "--longest_side", "160"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_clips"] == 1 and len(report["failed"]) == 1


@needs_faces
def test_beam_direct_runner_writes_the_same_shards_as_plain(footage, tmp_path):
    beam = pytest.importorskip("apache_beam", reason="needs the `data-engine` extra")
    del beam
    from avatarv_jax.data.ingest.beam import ingest_beam
    from avatarv_jax.data.ingest.plain import ingest_plain

    src = tmp_path / "in"
    src.mkdir()
    for name in ("good.mp4", "good.txt", "cut.mp4", "dark.mp4", "truncated.mp4"):
        shutil.copy(os.path.join(footage["dir"], name), src)
    shutil.copy(os.path.join(footage["dir"], "good.mp4"), src / "zz_again.mp4")
    plain = ingest_plain(str(src), str(tmp_path / "plain"), CFG, log=lambda _: None)
    beamed = ingest_beam(str(src), str(tmp_path / "beam"), CFG,
                         pipeline_args=["--direct_num_workers=1"])
    assert beamed == plain
    assert plain["num_clips"] == 2
    assert plain["report"]["duplicates"] == {"good.mp4": ["zz_again.mp4"]}
    assert [c["caption"] for c in beamed["clips"]] == [CFG.caption,
                                                      "an astronaut in front of a flag"]
    for shard in plain["shards"]:
        a = (tmp_path / "plain" / shard["path"]).read_bytes()
        assert a == (tmp_path / "beam" / shard["path"]).read_bytes()
    a = (tmp_path / "plain" / "identity_graph.npz").read_bytes()
    assert a == (tmp_path / "beam" / "identity_graph.npz").read_bytes()
