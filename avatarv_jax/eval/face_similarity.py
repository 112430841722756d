"""Face similarity: cosine of face embeddings between generated frames and reference frames.

Two embedders share one interface, ``embed(frames) -> float32 [N, D]`` with a NaN row where no
face is found: ``DlibEmbedder`` (the 128-d dlib ResNet descriptor of the ``faces`` extra, for
real faces) and ``ProbeEmbedder`` (the AvatarWorld probe's attribute embedding, for AvatarWorld
people, whom dlib was never trained on). Scores use a few evenly spaced frames of each video
(face embedders are slow next to everything else here), and compare the mean embeddings.
"""

from __future__ import annotations

import numpy as np

DEFAULT_FRAMES = 8


def sample_frames(frames: np.ndarray, count: int = DEFAULT_FRAMES) -> np.ndarray:
    """``count`` evenly spaced frames (all of them when there are fewer)."""
    frames = np.asarray(frames)
    if frames.ndim == 3:
        frames = frames[None]
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[0] == 0:
        raise ValueError(f"frames must be uint8 [N, H, W, 3] with N >= 1, got {frames.shape}")
    if frames.shape[0] <= count:
        return frames
    return frames[np.linspace(0, frames.shape[0] - 1, count).round().astype(int)]


class DlibEmbedder:
    """dlib's HOG face detector + 68 landmarks + 128-d descriptor; the best-scoring face."""

    name = "dlib128"

    def __init__(self, upsample: int = 1, threshold: float = -0.5):
        from avatarv_jax.data.ingest.faces import shared_models

        self.models, self.upsample, self.threshold = shared_models(), upsample, threshold

    def embed(self, frames: np.ndarray) -> np.ndarray:
        frames = np.asarray(frames)
        out = np.full((frames.shape[0], 128), np.nan, np.float32)
        for i, frame in enumerate(frames):
            boxes = self.models.detect(frame, self.upsample, self.threshold)
            if len(boxes):
                out[i] = self.models.embedding(frame, boxes[0])
        return out


class ProbeEmbedder:
    """The AvatarWorld probe's identity embedding (L2-normalised attribute probabilities)."""

    name = "avatarworld_probe"

    def __init__(self, probe=None):
        from avatarv_jax.data.avatarworld.probe import load_probe

        self.probe = probe or load_probe()

    def embed(self, frames: np.ndarray) -> np.ndarray:
        return self.probe.read(np.asarray(frames)).embedding


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def face_similarity(generated: np.ndarray, reference: np.ndarray, embedder,
                    frames: int = DEFAULT_FRAMES) -> dict[str, float]:
    """Cosine of the mean face embeddings of ``generated`` and ``reference`` frames.

    Also the mean per-frame cosine against the reference mean, and the fraction of sampled
    generated frames with a face. NaN scores when either side shows no face at all.
    """
    g = embedder.embed(sample_frames(generated, frames))
    r = embedder.embed(sample_frames(reference, frames))
    g_ok, r_ok = np.isfinite(g).all(1), np.isfinite(r).all(1)
    out = {"face_found_fraction": float(g_ok.mean())}
    if not g_ok.any() or not r_ok.any():
        return {**out, "face_similarity": float("nan"), "face_similarity_per_frame": float("nan")}
    ref = r[r_ok].mean(0)
    out["face_similarity"] = cosine(g[g_ok].mean(0), ref)
    out["face_similarity_per_frame"] = float(np.mean([cosine(e, ref) for e in g[g_ok]]))
    return out
