"""The Sparse Reference Attention rule as data.

A sample's sequence is ``[REF frames | GEN frames]``, every frame ``tokens_per_frame`` tokens.

| query in    | may attend to                                                       |
|-------------|---------------------------------------------------------------------|
| REF frame i | REF frames j with ``|i - j| <= ref_window`` (``-1``: all REF)       |
| GEN frame g | all valid REF frames, GEN frames with ``|g - h| <= gen_window``      |

REF never sees GEN. Each query's allowed keys are at most two contiguous ranges (one in REF,
one in GEN); ``key_ranges`` returns them per frame, which is what a block-sparse kernel needs.
Windows are counted in latent frames.
"""

from __future__ import annotations

import dataclasses

import numpy as np

ALL = -1  # a window of "all frames"


@dataclasses.dataclass(frozen=True)
class SRALayout:
    ref_frames: int
    gen_frames: int
    tokens_per_frame: int
    ref_window: int = 0
    gen_window: int = ALL

    def __post_init__(self):
        if (self.ref_frames < 0 or self.gen_frames < 0 or self.ref_frames + self.gen_frames < 1
                or self.tokens_per_frame < 1):
            raise ValueError(f"invalid SRA layout {self}: need frames >= 0 (at least one in all) "
                             "and tokens_per_frame >= 1")
        for name in ("ref_window", "gen_window"):
            if getattr(self, name) < ALL:
                raise ValueError(f"{name} must be >= 0 or -1 (all), got {getattr(self, name)}")

    @property
    def ref_len(self) -> int:
        return self.ref_frames * self.tokens_per_frame

    @property
    def gen_len(self) -> int:
        return self.gen_frames * self.tokens_per_frame

    @staticmethod
    def _window(frame: np.ndarray, window: int, num_frames: int):
        """First and one-past-last frame within ``window`` of ``frame``."""
        if window == ALL:
            return np.zeros_like(frame), np.full_like(frame, num_frames)
        return np.maximum(frame - window, 0), np.minimum(frame + window + 1, num_frames)

    def ref_frame_ranges(self) -> np.ndarray:
        """[ref_frames, 2] first/one-past-last REF key frame for each REF query frame."""
        f = np.arange(self.ref_frames)
        return np.stack(self._window(f, self.ref_window, self.ref_frames), axis=-1)

    def gen_frame_ranges(self) -> np.ndarray:
        """[gen_frames, 2] first/one-past-last GEN key frame for each GEN query frame."""
        f = np.arange(self.gen_frames)
        return np.stack(self._window(f, self.gen_window, self.gen_frames), axis=-1)

    def key_ranges(self) -> np.ndarray:
        """[ref_len + gen_len, 4] token ranges (ref_lo, ref_hi, gen_lo, gen_hi) per query.

        Indices are positions in the concatenated key sequence ``[REF | GEN]``; an empty
        range has ``lo == hi``.
        """
        t = self.tokens_per_frame
        ref = self.ref_frame_ranges() * t
        gen = self.gen_frame_ranges() * t + self.ref_len
        ref_rows = np.concatenate([ref, np.full_like(ref, self.ref_len)], axis=-1)
        gen_rows = np.concatenate(
            [np.tile(np.array([[0, self.ref_len]]), (self.gen_frames, 1)), gen], axis=-1)
        rows = np.concatenate([ref_rows, gen_rows], axis=0)
        return np.repeat(rows, t, axis=0)

    def dense_mask(self, ref_valid_frames: int | None = None) -> np.ndarray:
        """Boolean [ref_len + gen_len, ref_len + gen_len] mask; True = may attend.

        ``ref_valid_frames`` hides REF frames at and beyond it from GEN queries (padding, or a
        dropped reference in training); REF queries keep their own windows.
        """
        ranges = self.key_ranges()
        keys = np.arange(self.ref_len + self.gen_len)[None, :]
        ref_hi = ranges[:, 1:2].copy()
        if ref_valid_frames is not None:
            is_gen = np.arange(ranges.shape[0])[:, None] >= self.ref_len
            limit = ref_valid_frames * self.tokens_per_frame
            ref_hi = np.where(is_gen, np.minimum(ref_hi, limit), ref_hi)
        in_ref = (keys >= ranges[:, 0:1]) & (keys < ref_hi)
        in_gen = (keys >= ranges[:, 2:3]) & (keys < ranges[:, 3:4])
        return in_ref | in_gen

    def allowed_pairs(self) -> int:
        """Number of allowed (query, key) pairs, from the frame ranges (no mask built).

        REF rows cost ``T^2 * sum_i |window(i)|`` (``N_ref * T * (2w+1)`` at most) and GEN rows
        ``N_gen * N_ref + T^2 * sum_g |window(g)|``: linear in the reference length for a
        finite ``ref_window``.
        """
        t2 = self.tokens_per_frame ** 2
        ref = self.ref_frame_ranges()
        gen = self.gen_frame_ranges()
        return int(t2 * np.sum(ref[:, 1] - ref[:, 0]) + self.gen_len * self.ref_len
                   + t2 * np.sum(gen[:, 1] - gen[:, 0]))
