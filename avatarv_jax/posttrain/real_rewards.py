"""Rewards on real video: LSE-C lip sync (in the step) and dlib face similarity (on the host).

``lse_c``: SyncNet confidence of the decoded frames against the driving audio.
The project's SyncNet (``eval/syncnet.py``, its shipped AvatarWorld weights a constant of the
step) is JAX, so the whole chain runs on the device, with no host round trip between sampling
and the update:

* mouth crops: one square box per clip from the batch's ``mask_mouth`` / ``mask_face``
  (centre of the mouth mask's box over the clip's frames, side ``MOUTH_BOX_SCALE`` times the
  face mask's height; the eval front end takes medians over frames, here the union box, which
  reaches up to 2 px lower at 64 px where the jaw drops), grey levels sampled with an antialiased linear resize
  (``jax.image.scale_and_translate``) at the SyncNet's crop size;
* MFCCs of the driving audio: ``eval/frontends.mfcc`` written in ``jnp`` (same pre-emphasis,
  Hamming window, mel bank, log floor and DCT; a test checks it against the numpy one);
* the offset search of ``eval/lse.py`` with ``padding="valid"``: ``d(k)`` the mean distance of
  video window ``t`` to audio window ``t + k``, ``lse_c = median_k d(k) - min_k d(k)``, with
  ``|k| <= min(15, windows - 1)``.

LSE-C measures how sharply the lips pick one audio offset; it does not say that offset is 0
(the eval reports the offset separately). A clip needs at least 7 frames (3 windows).

``face_similarity``: cosine of the mean dlib 128-d face descriptors of a few generated frames
and of the reference frames (``eval/face_similarity.py``); 0 when either side shows no face.
dlib runs on the host only, so the step calls it through ``jax.pure_callback``: the step stays
one jitted program (the trainer's sharding, donation, NaN guard and exact resume unchanged),
and only the decoded frames (G samples of one batch) travel to the host. On a mesh that
shards the batch, ``parallel.host_callback.per_shard_callback`` runs it once per batch shard,
so on several hosts each scores its own samples (tested with two processes). Splitting the step
into a jitted sampling call, host rewards and a jitted update would need a second train-step
protocol in the trainer for the same data movement.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
import scipy.fft
from flax import nnx

from avatarv_jax.eval import frontends as fe
from avatarv_jax.eval import lse
from avatarv_jax.parallel.host_callback import per_shard_callback
from avatarv_jax.training.batch import clip_wave

REAL_REWARDS = ("lse_c", "face_similarity")
NEEDS = {"lse_c": ("audio", "mask_mouth", "mask_face"), "face_similarity": ()}


def check_batch_fields(weights: Mapping[str, float], batch: Mapping) -> None:
    """A clear error when a weighted reward needs batch fields the data does not give."""
    for name in weights:
        missing = [k for k in NEEDS.get(name, ()) if k not in batch]
        if missing:
            raise ValueError(f"the {name} reward needs {missing} in the batch (the data gives "
                             f"{sorted(batch)}); drop it from reward_weights or use data with "
                             "face/mouth masks and waveform audio")


def mfcc(audio: jax.Array) -> jax.Array:
    """``frontends.mfcc`` in jnp, batched: 16 kHz audio [B, N] -> [B, N // 160, 13]."""
    sr = fe.SAMPLE_RATE
    win, hop, n_fft = round(0.025 * sr), sr // fe.MFCC_RATE, 512
    audio = audio.astype(jnp.float32)
    count = audio.shape[1] // hop
    x = jnp.concatenate([audio[:, :1], audio[:, 1:] - 0.97 * audio[:, :-1]], axis=1)
    x = jnp.pad(x, ((0, 0), (win // 2, win)))
    idx = np.arange(count)[:, None] * hop + np.arange(win)[None, :]
    frames = x[:, idx] * jnp.asarray(np.hamming(win), jnp.float32)
    power = jnp.abs(jnp.fft.rfft(frames, n_fft)) ** 2 / n_fft
    bank = jnp.asarray(fe.mel_filterbank(26, n_fft, sr).T, jnp.float32)
    logs = jnp.log(jnp.maximum(power @ bank, fe.ENERGY_FLOOR))
    dct = jnp.asarray(scipy.fft.dct(np.eye(26), type=2, axis=1, norm="ortho")[:, :fe.NUM_MFCC],
                      jnp.float32)
    return logs @ dct


def _extent(mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[B, T, H, W] bool -> first and last+1 index along H and along W of the union: [B, 2]."""
    def span(any_):                                   # [B, L] -> (lo, hi)
        n = any_.shape[1]
        lo = jnp.argmax(any_, axis=1)
        hi = n - jnp.argmax(any_[:, ::-1], axis=1)
        return lo, hi
    rows, cols = mask.any(axis=(1, 3)), mask.any(axis=(1, 2))
    (y0, y1), (x0, x1) = span(rows), span(cols)
    return jnp.stack([x0, y0], -1).astype(jnp.float32), jnp.stack([x1, y1], -1).astype(jnp.float32)


def mouth_boxes(mask_mouth: jax.Array, mask_face: jax.Array,
                scale: float = fe.MOUTH_BOX_SCALE) -> jax.Array:
    """One square box (x0, y0, x1, y1) per clip [B, 4] from bool masks [B, T, H, W]."""
    m0, m1 = _extent(mask_mouth.astype(bool))
    f0, f1 = _extent(mask_face.astype(bool))
    centre = (m0 + m1) / 2
    side = jnp.maximum(scale * (f1[:, 1] - f0[:, 1]), 4.0)[:, None]
    return jnp.concatenate([centre - side / 2, centre + side / 2], axis=-1)


def crop_mouths(frames: jax.Array, boxes: jax.Array, size: int) -> jax.Array:
    """Frames [B, T, H, W, 3] in [-1, 1] and boxes [B, 4] -> grey crops [B, T, size, size]
    in [-1, 1] (antialiased linear resampling of the box)."""
    grey = frames.astype(jnp.float32) @ jnp.asarray([0.299, 0.587, 0.114], jnp.float32)

    def one(clip, box):
        side = box[2] - box[0]
        s = size / side
        return jax.image.scale_and_translate(
            clip, (clip.shape[0], size, size), (1, 2), jnp.stack([s, s]),
            jnp.stack([-box[1] * s, -box[0] * s]), method="linear", antialias=True)

    return jax.vmap(one)(grey, boxes)


def offset_lse_c(v: jax.Array, a: jax.Array, max_offset: int) -> jax.Array:
    """Embeddings [B, N, D] of video and audio windows -> LSE-C [B] (``eval/lse.py``,
    ``padding="valid"``)."""
    n = v.shape[1]
    ds = []
    for k in range(-max_offset, max_offset + 1):
        lo, hi = max(0, -k), min(n, n - k)
        d = jnp.linalg.norm(v[:, lo:hi] - a[:, lo + k:hi + k], axis=-1)
        ds.append(d.mean(axis=1))
    d = jnp.stack(ds, axis=1)
    return jnp.median(d, axis=1) - d.min(axis=1)


class LseCReward:
    """SyncNet confidence of decoded frames against the driving audio, [B], higher better."""

    def __init__(self, syncnet=None, max_offset: int = lse.MAX_OFFSET):
        from avatarv_jax.eval.syncnet import load_syncnet

        model = syncnet or load_syncnet()
        self.crop_size = model.config.crop_size
        self.graphdef, self.state = nnx.split(model)
        self.max_offset = int(max_offset)

    def __call__(self, frames: jax.Array, batch: Mapping[str, jax.Array]) -> jax.Array:
        """``frames`` [B, T, H, W, 3] in [-1, 1]; ``batch`` holds ``audio`` [B, (T + 2m) * 640]
        and the masks ``mask_mouth`` / ``mask_face`` [B, T', H, W] at the frames' size."""
        check_batch_fields({"lse_c": 1.0}, batch)
        b, t, h, w, _ = frames.shape
        windows = t - fe.WINDOW_FRAMES + 1
        k = min(self.max_offset, windows - 1)
        if k < 1:
            raise ValueError(f"the lse_c reward needs clips of at least {fe.WINDOW_FRAMES + 2} "
                             f"frames (3 SyncNet windows), got {t}")
        audio = batch["audio"]
        if audio.ndim != 2:
            raise ValueError("the lse_c reward needs waveform audio [B, N] in the batch, got "
                             f"shape {audio.shape} (precomputed features)")
        audio = clip_wave(audio, t)       # the clip's own samples (drop the encoder's context)
        if batch["mask_mouth"].shape[2:] != (h, w):
            raise ValueError(f"masks are {batch['mask_mouth'].shape[2:]}, the frames {(h, w)}")
        boxes = mouth_boxes(batch["mask_mouth"], batch["mask_face"])
        crops = crop_mouths(frames, boxes, self.crop_size)                 # [B, T, S, S]
        idx = np.arange(windows)[:, None] + np.arange(fe.WINDOW_FRAMES)[None, :]
        vw = jnp.moveaxis(crops[:, idx], 2, -1)                            # [B, N, S, S, 5]
        m = mfcc(audio)
        need = t * fe.MFCC_PER_FRAME
        if m.shape[1] < need:
            m = jnp.concatenate([m, jnp.repeat(m[:, -1:], need - m.shape[1], 1)], axis=1)
        m = m[:, :need]
        aidx = (np.arange(windows)[:, None] * fe.MFCC_PER_FRAME
                + np.arange(fe.WINDOW_MFCC)[None, :])
        aw = jnp.swapaxes(m[:, aidx], 2, 3)[..., None]                    # [B, N, 13, 20, 1]
        net = nnx.merge(self.graphdef, self.state)
        v = net.video(vw.reshape((b * windows,) + vw.shape[2:])).reshape(b, windows, -1)
        a = net.audio(aw.reshape((b * windows,) + aw.shape[2:])).reshape(b, windows, -1)
        return offset_lse_c(v, a, k)


class FaceSimilarityReward:
    """dlib face similarity of decoded frames to the reference frames, [B] (host callback)."""

    def __init__(self, embedder=None, frames: int = 4):
        from avatarv_jax.eval.face_similarity import DlibEmbedder

        self.embedder = embedder or DlibEmbedder(upsample=2)
        self.frames = int(frames)

    def host(self, frames: np.ndarray, ref: np.ndarray) -> np.ndarray:
        from avatarv_jax.eval.face_similarity import face_similarity

        to_uint8 = lambda x: np.clip((np.asarray(x) + 1.0) * 127.5, 0, 255).round().astype(np.uint8)
        out = np.zeros(frames.shape[0], np.float32)
        for i in range(frames.shape[0]):
            score = face_similarity(to_uint8(frames[i]), to_uint8(ref[i]), self.embedder,
                                    self.frames)["face_similarity"]
            out[i] = score if np.isfinite(score) else 0.0
        return out

    def __call__(self, frames: jax.Array, ref_frames: jax.Array) -> jax.Array:
        """``frames`` [B, T, H, W, 3] and ``ref_frames`` [B, Tr, H, W, 3], both in [-1, 1]."""
        return per_shard_callback(self.host, jnp.float32, frames.astype(jnp.float32),
                                  ref_frames.astype(jnp.float32))
