"""The baselines every report carries, so that a number can be read against known points.

- ``ground_truth``: the real clip with its own audio (the best any model can do).
- ``frozen_reference``: the reference frame held still for the whole clip, with the real audio
  (perfect identity, no motion at all: the floor for motion and lip sync).
- ``shuffled_audio``: the real video with the audio of another case (perfect frames, no sync:
  the floor for lip sync).
"""

from __future__ import annotations

import numpy as np

SYSTEMS = ("ground_truth", "frozen_reference", "shuffled_audio")


def derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    """A random permutation with no fixed point (each case gets another case's audio)."""
    if n < 2:
        raise ValueError(f"shuffled audio needs at least 2 cases, got {n}")
    while True:
        p = rng.permutation(n)
        if not (p == np.arange(n)).any():
            return p


def fit_length(audio: np.ndarray, num_samples: int) -> np.ndarray:
    """Cut, or repeat from the start, to exactly ``num_samples``."""
    audio = np.asarray(audio, np.float32)
    if audio.size == 0:
        raise ValueError("cannot fit an empty waveform")
    return np.resize(audio, num_samples).astype(np.float32)


def frozen_reference(reference_frame: np.ndarray, num_frames: int) -> np.ndarray:
    """The reference frame repeated: uint8 [num_frames, H, W, 3] (a broadcast view, no copy)."""
    frame = np.asarray(reference_frame)
    if frame.ndim != 3 or frame.shape[-1] != 3:
        raise ValueError(f"the reference frame must be [H, W, 3], got {frame.shape}")
    return np.broadcast_to(frame, (num_frames,) + frame.shape)


def baseline_inputs(frames: list[np.ndarray], audios: list[np.ndarray],
                    reference_frames: list[np.ndarray], seed: int = 0
                    ) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """(frames, audio) per case for each baseline in ``SYSTEMS``."""
    n = len(frames)
    if not (n == len(audios) == len(reference_frames)):
        raise ValueError("frames, audios and reference_frames must have one entry per case")
    perm = derangement(n, np.random.default_rng(seed))
    return {
        "ground_truth": list(zip(frames, audios)),
        "frozen_reference": [(frozen_reference(r, f.shape[0]), a)
                             for f, a, r in zip(frames, audios, reference_frames)],
        "shuffled_audio": [(f, fit_length(audios[perm[i]], a.size))
                           for i, (f, a) in enumerate(zip(frames, audios))],
    }
