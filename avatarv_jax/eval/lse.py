"""LSE-C and LSE-D: lip-sync error by the SyncNet offset search (Prajwal et al. 2020 protocol).

For every 5-frame window t the video embedding v_t is compared with the audio embeddings
a_{t+k} for offsets k in [-15, 15]; ``d(k)`` is the mean Euclidean distance over windows.
LSE-D = min_k d(k) (lower is better), LSE-C = median_k d(k) - min_k d(k) (higher is better:
a sharp minimum), and the offset is the argmin. Sign: a positive offset means the audio is late
(the lips at frame t match the sound at frame t + k).

``padding="valid"`` (the default) averages each offset over the windows that have a partner;
``padding="zeros"`` pads the audio embeddings with zero vectors as syncnet_python does. With
L2-normalised embeddings zero padding sits at distance 1, below a typical mismatch, and pulls
the minimum towards large offsets on short clips, so the valid mean is the default here.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from avatarv_jax.eval import frontends as fe

MAX_OFFSET = 15


@dataclasses.dataclass(frozen=True)
class SyncScore:
    lse_d: float
    lse_c: float
    offset: int
    distances: np.ndarray  # float64 [2 * max_offset + 1], d(k) for k = -max_offset..max_offset

    def as_dict(self) -> dict[str, float]:
        return {"lse_d": self.lse_d, "lse_c": self.lse_c, "sync_offset": float(self.offset)}


def offset_distances(video: np.ndarray, audio: np.ndarray, max_offset: int = MAX_OFFSET,
                     padding: str = "valid") -> np.ndarray:
    """Mean distance d(k) between v_t and a_{t+k} for k = -max_offset..max_offset."""
    video, audio = np.asarray(video, np.float64), np.asarray(audio, np.float64)
    if video.ndim != 2 or video.shape != audio.shape:
        raise ValueError(f"video and audio embeddings must be [N, D] of one shape, got "
                         f"{video.shape} and {audio.shape}")
    if padding not in ("valid", "zeros"):
        raise ValueError(f"padding must be 'valid' or 'zeros', got {padding!r}")
    n = video.shape[0]
    if padding == "valid" and n <= max_offset:
        raise ValueError(f"{n} windows are too few for offsets of +-{max_offset} "
                         f"(a clip needs more than {max_offset + fe.WINDOW_FRAMES - 1} frames)")
    out = np.empty(2 * max_offset + 1)
    for i, k in enumerate(range(-max_offset, max_offset + 1)):
        lo = min(max(0, -k), n)          # v_lo .. v_hi-1 have a partner a_{t+k}
        hi = max(min(n, n - k), lo)      # (none when |k| >= n: all padding)
        d = np.linalg.norm(video[lo:hi] - audio[lo + k:hi + k], axis=1)
        if padding == "zeros":
            pad = np.linalg.norm(np.concatenate([video[:lo], video[hi:]]), axis=1)
            out[i] = (d.sum() + pad.sum()) / n
        else:
            out[i] = d.mean()
    return out


def sync_score(video: np.ndarray, audio: np.ndarray, max_offset: int = MAX_OFFSET,
               padding: str = "valid") -> SyncScore:
    """LSE-D, LSE-C and the offset from per-window embeddings [N, D]."""
    d = offset_distances(video, audio, max_offset, padding)
    i = int(np.argmin(d))
    return SyncScore(lse_d=float(d[i]), lse_c=float(np.median(d) - d[i]),
                     offset=i - max_offset, distances=d)


def shift_audio(audio: np.ndarray, frames: int) -> np.ndarray:
    """Delay (positive) or advance (negative) 16 kHz audio by whole video frames, same length;
    the gap is silence."""
    audio = np.asarray(audio, np.float32)
    s = int(frames) * fe.SAMPLE_RATE // fe.FPS
    out = np.zeros_like(audio)
    if s >= 0:
        out[s:] = audio[:audio.size - s]
    else:
        out[:s] = audio[-s:]
    return out


def clip_sync(scorer, frames: np.ndarray, audio: np.ndarray, box: np.ndarray,
              max_offset: int = MAX_OFFSET, padding: str | None = None) -> SyncScore:
    """The whole chain for one clip: crops inside ``box``, embeddings, the offset search.

    A scorer with its own front end (``syncnet_original.OriginalSyncScorer``: face crops, the
    original's zero padding) supplies ``crop(frames, box)`` and a ``padding`` default;
    otherwise mouth crops and ``"valid"``.
    """
    crop = getattr(scorer, "crop", None)
    crops = (crop(frames, box) if crop is not None
             else fe.crop_mouths(frames, box, scorer.model.config.crop_size))
    v, a = scorer.embed(crops, audio)
    return sync_score(v, a, max_offset, padding or getattr(scorer, "padding", "valid"))
