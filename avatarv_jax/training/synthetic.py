"""Synthetic batches that follow the pipeline contract, as a Grain dataset.

For tests and benchmarks without a data set (MaxText's synthetic mode): batch ``i`` is drawn
from ``seed + i``, so the data is reproducible and the iterator state is real Grain state
(``get_state`` / ``set_state``), which the checkpoint tests rely on.
"""

from __future__ import annotations

import grain
import numpy as np

SAMPLES_PER_FRAME = 640   # 16 kHz audio at 25 fps


def synthetic_batch(index: int, stage: str, *, batch_size: int, num_frames: int,
                    ref_frames: int, resolution: int, text_len: int, motion_dim: int = 10,
                    vocab: int = 256, seed: int = 0, latent_shape: tuple | None = None) -> dict:
    """One batch of ``stage`` (pixels, or latents when ``latent_shape = (h, w, C)``)."""
    rng = np.random.default_rng(seed * 1_000_003 + index)
    b, t, r, s = batch_size, num_frames, ref_frames, resolution

    def video(frames):
        if latent_shape is not None:
            f = 1 + (frames - 1) // 4
            return rng.standard_normal((b, f) + tuple(latent_shape)).astype(np.float32)
        return rng.integers(0, 256, (b, frames, s, s, 3), dtype=np.uint8)

    lengths = rng.integers(1, text_len + 1, b)
    mask = np.arange(text_len)[None] < lengths[:, None]
    out = {"latents" if latent_shape else "video": video(t),
           "text_ids": np.where(mask, rng.integers(1, vocab, (b, text_len)), 0).astype(np.int32),
           "text_mask": mask, "identity_id": rng.integers(0, 8, b).astype(np.int32)}
    if stage in ("a2v", "sft"):
        out["audio"] = (0.1 * rng.standard_normal((b, t * SAMPLES_PER_FRAME))).astype(np.float32)
        out["ref_latents" if latent_shape else "ref_video"] = video(1 if stage == "a2v" else r)
    if stage == "sft":
        out["motion"] = rng.standard_normal((b, t, motion_dim)).astype(np.float32)
        for key, p in (("mask_face", 0.4), ("mask_mouth", 0.1), ("mask_eyes", 0.1)):
            size = latent_shape[:2] if latent_shape else (s, s)
            size = (size[0] * 8, size[1] * 8) if latent_shape else size
            out[key] = rng.random((b, t) + tuple(size)) < p
        out["ref_audio"] = (0.1 * rng.standard_normal((b, r * SAMPLES_PER_FRAME))
                            ).astype(np.float32)
        out["ref_motion"] = rng.standard_normal((b, r, motion_dim)).astype(np.float32)
    return out


def synthetic_dataset(stage: str, *, num_batches: int, **kwargs) -> grain.IterDataset:
    """``num_batches`` synthetic batches as a Grain IterDataset (checkpointable iterator)."""
    return (grain.MapDataset.range(num_batches)
            .map(lambda i: synthetic_batch(int(i), stage, **kwargs))
            .to_iter_dataset())
