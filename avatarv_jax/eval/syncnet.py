"""SyncNet in Flax NNX: a video stream over 5 mouth crops and an audio stream over 20 MFCCs.

The architecture of Chung & Zisserman (2016): two convolutional towers map 0.2 s of lips (5
grey-level frames stacked as channels) and the same 0.2 s of audio (13 x 20 MFCCs) into one
embedding space where in-sync pairs are close. Distances between the towers' embeddings over
audio offsets give the sync offset and the LSE-C / LSE-D scores (``lse.py``).

Widths are configurable: ``SyncNetConfig.small()`` is the model trained on AvatarWorld that
ships in ``assets/syncnet_avatarworld.safetensors`` (32 px crops, 128-d embeddings);
``SyncNetConfig.standard()`` has the original paper's tower widths and 1024-d embedding. Norms
are group norms (the original's batch norms carry running statistics that a functional model
does not need). Embeddings are L2-normalised when ``normalize`` is set, so distances lie in
[0, 2]; numbers are comparable between models of this family, not with the paper's scale.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avatarv_jax.eval import frontends as fe
from avatarv_jax.io.small_weights import load_params, read_weights, save_weights

ASSET_PATH = os.path.join(os.path.dirname(__file__), "assets", "syncnet_avatarworld.safetensors")


@dataclasses.dataclass(frozen=True)
class SyncNetConfig:
    crop_size: int = fe.CROP_SIZE
    video_channels: tuple[int, ...] = (24, 48, 64, 96)
    video_strides: tuple[int, ...] = (2, 2, 1, 2)
    audio_channels: tuple[int, ...] = (16, 32, 48, 64)
    audio_strides: tuple[tuple[int, int], ...] = ((1, 1), (1, 2), (2, 2), (2, 2))
    hidden: int = 256
    embed_dim: int = 128
    normalize: bool = True

    @classmethod
    def small(cls) -> "SyncNetConfig":
        return cls()

    @classmethod
    def standard(cls) -> "SyncNetConfig":
        """The paper's widths (96-256-384-256-256 video, 64-...-256 audio, 512 fc, 1024-d)."""
        return cls(crop_size=112, video_channels=(96, 256, 384, 256, 256),
                   video_strides=(2, 2, 1, 2, 2), audio_channels=(64, 192, 384, 256, 256),
                   audio_strides=((1, 1), (1, 2), (1, 1), (2, 2), (2, 2)), hidden=512,
                   embed_dim=1024, normalize=False)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "SyncNetConfig":
        d = json.loads(text)
        d["video_channels"] = tuple(d["video_channels"])
        d["video_strides"] = tuple(d["video_strides"])
        d["audio_channels"] = tuple(d["audio_channels"])
        d["audio_strides"] = tuple(tuple(s) for s in d["audio_strides"])
        return cls(**d)


def _out_size(size: int, strides) -> int:
    for s in strides:
        size = -(-size // s)
    return size


class Tower(nnx.Module):
    """3x3 convolutions with group norm and ReLU, then two dense layers to the embedding."""

    def __init__(self, in_channels: int, channels, strides, in_hw: tuple[int, int], hidden: int,
                 embed_dim: int, *, rngs: nnx.Rngs):
        strides = [s if isinstance(s, (tuple, list)) else (s, s) for s in strides]
        ins = (in_channels,) + tuple(channels[:-1])
        self.convs = nnx.List([nnx.Conv(i, o, (3, 3), strides=tuple(s), rngs=rngs)
                               for i, o, s in zip(ins, channels, strides)])
        self.norms = nnx.List([nnx.GroupNorm(o, num_groups=min(8, o), rngs=rngs)
                               for o in channels])
        h = _out_size(in_hw[0], [s[0] for s in strides])
        w = _out_size(in_hw[1], [s[1] for s in strides])
        self.fc = nnx.Linear(h * w * channels[-1], hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, embed_dim, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        for conv, norm in zip(self.convs, self.norms):
            x = jax.nn.relu(norm(conv(x)))
        return self.out(jax.nn.relu(self.fc(x.reshape(x.shape[0], -1))))


class SyncNet(nnx.Module):
    """``video(x [N, S, S, 5])`` and ``audio(m [N, 13, 20, 1])`` -> embeddings [N, embed_dim]."""

    def __init__(self, config: SyncNetConfig = SyncNetConfig(), *, rngs: nnx.Rngs):
        self.config = config
        c = config
        self.video_tower = Tower(fe.WINDOW_FRAMES, c.video_channels, c.video_strides,
                                 (c.crop_size, c.crop_size), c.hidden, c.embed_dim, rngs=rngs)
        self.audio_tower = Tower(1, c.audio_channels, c.audio_strides,
                                 (fe.NUM_MFCC, fe.WINDOW_MFCC), c.hidden, c.embed_dim, rngs=rngs)

    def _finish(self, e: jax.Array) -> jax.Array:
        if self.config.normalize:
            e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), 1e-6)
        return e

    def video(self, x: jax.Array) -> jax.Array:
        return self._finish(self.video_tower(x))

    def audio(self, m: jax.Array) -> jax.Array:
        # MFCCs span tens of units (c0 most); a fixed scale keeps the first conv in range.
        return self._finish(self.audio_tower(m / 10.0))


def make_syncnet(config: SyncNetConfig | None = None, seed: int = 0) -> SyncNet:
    return SyncNet(config or SyncNetConfig(), rngs=nnx.Rngs(seed))


def save_syncnet(model: SyncNet, path: str, meta: dict[str, Any] | None = None,
                 dtype=np.float16) -> None:
    """Safetensors with the config and ``meta`` as metadata; written to a temp name, renamed."""
    save_weights(model, path, model.config.to_json(), meta, dtype)


def load_syncnet(path: str | None = None) -> SyncNet:
    """The shipped AvatarWorld SyncNet (or the safetensors file at ``path``)."""
    path = path or ASSET_PATH
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SyncNet weights not found at {path}; train them with "
                                f"`python -m avatarv_jax.eval.syncnet_train --out {path}`")
    tensors, metadata = read_weights(path)
    if "config" not in metadata:
        raise ValueError(f"{path} has no SyncNet config in its metadata")
    model = make_syncnet(SyncNetConfig.from_json(metadata["config"]))
    return load_params(model, tensors, path)


def read_meta(path: str | None = None) -> dict[str, Any]:
    """The training record stored with the weights (recipe and held-out results)."""
    from safetensors import safe_open

    with safe_open(path or ASSET_PATH, framework="numpy") as f:
        return json.loads((f.metadata() or {}).get("meta", "{}"))


class SyncScorer:
    """Jitted embeddings of whole clips: crops + MFCCs -> per-window video and audio embeddings."""

    def __init__(self, model: SyncNet, batch: int = 128):
        self.model, self.batch = model, batch
        graphdef, state = nnx.split(model)
        self._state = state

        @jax.jit
        def embed_video(state, x):
            return nnx.merge(graphdef, state).video(x)

        @jax.jit
        def embed_audio(state, m):
            return nnx.merge(graphdef, state).audio(m)

        self._video, self._audio = embed_video, embed_audio

    def _batched(self, fn, x: np.ndarray) -> np.ndarray:
        outs = []
        for s in range(0, x.shape[0], self.batch):
            chunk = x[s:s + self.batch]
            pad = self.batch - chunk.shape[0]
            if pad:  # one compiled shape
                chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)])
            outs.append(np.asarray(fn(self._state, jnp.asarray(chunk)))[:self.batch - pad])
        return np.concatenate(outs).astype(np.float32)

    def embed(self, crops: np.ndarray, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Mouth crops [T, S, S] and 16 kHz audio -> video and audio embeddings [T - 4, D]."""
        size = self.model.config.crop_size
        if crops.ndim != 3 or crops.shape[1:] != (size, size):
            raise ValueError(f"crops must be [T, {size}, {size}], got {crops.shape}")
        vw = fe.video_windows(crops)
        aw = fe.audio_windows(fe.mfcc_for_frames(audio, crops.shape[0]), vw.shape[0])
        return self._batched(self._video, vw), self._batched(self._audio, aw)
