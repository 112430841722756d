"""Face similarity with the dlib 128-d embedding (the `faces` extra) on real faces."""

import numpy as np
import pytest

from avatarv_jax.data.ingest.faces import faces_available
from avatarv_jax.eval import face_similarity as fs

pytestmark = pytest.mark.skipif(not faces_available(), reason="needs the `faces` extra (dlib)")


def _shifted(image, dx, dy, scale):
    from skimage.transform import AffineTransform, warp

    h, w = image.shape[:2]
    tf = AffineTransform(scale=scale, translation=(dx + (1 - scale) * w / 2,
                                                   dy + (1 - scale) * h / 2))
    return (warp(image, tf.inverse, mode="edge") * 255).astype(np.uint8)


def _other_faces():
    """Real faces that ship with scikit-image (no download): LFW faces and the cameraman."""
    from skimage import data
    from skimage.transform import resize

    faces = []
    for face in data.lfw_subset()[:4]:  # the first 100 of the subset are faces
        big = (resize(face, (200, 200)) * 255).astype(np.uint8)
        faces.append(np.repeat(big[..., None], 3, -1))
    faces.append(np.repeat(data.camera()[..., None], 3, -1))
    return faces


def test_astronaut_is_more_like_itself_than_other_faces():
    from skimage import data

    astronaut = data.astronaut()
    embedder = fs.DlibEmbedder(upsample=2)
    ref = embedder.embed(astronaut[None])[0]
    assert np.isfinite(ref).all()
    variants = np.stack([_shifted(astronaut, dx, dy, s) for dx, dy, s in
                         [(8, 0, 1.0), (-6, 10, 1.0), (0, 0, 1.1), (5, -5, 0.9)]])
    same = [fs.cosine(e, ref) for e in embedder.embed(variants)]
    faces = _other_faces()
    others = embedder.embed(np.stack(faces[:4]))
    camera = embedder.embed(faces[4][None])
    other = [fs.cosine(e, ref) for e in np.concatenate([others, camera])
             if np.isfinite(e).all()]
    assert len(other) >= 3, "dlib should find most of the other faces"
    assert min(same) > max(other), (same, other)
    # the clip-level score: the shifted astronauts against the original
    score = fs.face_similarity(variants, astronaut[None], embedder)
    assert score["face_found_fraction"] == 1.0
    assert score["face_similarity"] > max(other)


def test_no_face_gives_nan():
    embedder = fs.DlibEmbedder()
    blank = np.full((2, 64, 64, 3), 128, np.uint8)
    out = fs.face_similarity(blank, blank, embedder)
    assert out["face_found_fraction"] == 0.0 and np.isnan(out["face_similarity"])


def test_sample_frames():
    frames = np.arange(20)[:, None, None, None] * np.ones((20, 2, 2, 3), np.uint8)
    picked = fs.sample_frames(frames, 5)
    assert picked[:, 0, 0, 0].tolist() == [0, 5, 10, 14, 19]
    with pytest.raises(ValueError, match="frames must be"):
        fs.sample_frames(np.zeros((0, 2, 2, 3)))


def test_real_video_mode_end_to_end(tmp_path):
    """GEN_DIR against REF_DIR: dlib mouth boxes, LSE, face similarity, the three baselines."""
    import json

    from avatarv_jax.eval.__main__ import main as eval_main
    from avatarv_jax.testing import write_astronaut_videos

    gen, ref = write_astronaut_videos(tmp_path, 192, 30)
    out = tmp_path / "report"
    assert eval_main([str(gen), "--references", str(ref), "--out", str(out)]) == 0
    rep = json.load(open(out / "report.json"))
    assert list(rep["per_clip"]) == ["generated", "ground_truth", "frozen_reference",
                                     "shuffled_audio"]
    for rows in rep["per_clip"].values():
        assert [r["case"] for r in rows] == ["a", "b"]
        for r in rows:
            assert r["face_found_fraction"] == 1.0 and r["face_similarity"] > 0.99
            assert np.isfinite(r["lse_c"]) and -15 <= r["sync_offset"] <= 15
    assert (out / "summary.md").is_file() and (out / "per_clip_distributions.png").is_file()
