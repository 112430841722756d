"""The AvatarWorld probe: a small conv net that reads motion and identity back from frames.

It is what makes AvatarWorld metrics exact for *generated* video: the model's frames go through
the probe, and its readings are compared with the ground truth the world knows. Input is any
square RGB frame, area-resized to 64 x 64. Outputs per frame: the motion vector (normalised to
[0, 1] per field, then mapped back to ``MOTION_RANGES``) and one softmax per static attribute.

The identity embedding is the concatenation of the per-attribute class probabilities,
L2-normalised: two frames of one person agree on every attribute and so have cosine ~1, and the
embedding means something (each block is an attribute) rather than being an opaque vector.

Trained weights ship in ``assets/probe.safetensors`` (float16); ``probe_train`` rebuilds them.
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

from avatarv_jax.data.avatarworld import identity as idn
from avatarv_jax.data.avatarworld import motion as mo
from avatarv_jax.io.small_weights import load_params, read_weights, save_weights

INPUT_SIZE = 64
ASSET_PATH = os.path.join(os.path.dirname(__file__), "assets", "probe.safetensors")
CLASS_OFFSETS = np.concatenate([[0], np.cumsum(idn.NUM_CLASSES)]).astype(int)
NUM_LOGITS = int(CLASS_OFFSETS[-1])
EMBEDDING_DIM = NUM_LOGITS


DEFAULT_STRIDES = (1, 2, 2, 2, 2)
"""The first convolution sees the 64 px input at full resolution: the features that tell noses,
eye shapes and mouth widths apart are one or two pixels wide there."""


class ProbeNet(nnx.Module):
    """3x3 convolutions with group norm (the later ones strided), a dense trunk, two heads."""

    def __init__(self, *, channels: tuple[int, ...] = (24, 48, 64, 96, 128),
                 strides: tuple[int, ...] = DEFAULT_STRIDES, hidden: int = 192, rngs: nnx.Rngs):
        if len(channels) != len(strides):
            raise ValueError("channels and strides must have the same length")
        self.channels, self.strides, self.hidden = tuple(channels), tuple(strides), hidden
        ins = (3,) + self.channels[:-1]
        self.convs = nnx.List([nnx.Conv(i, o, (3, 3), strides=s, rngs=rngs)
                               for i, o, s in zip(ins, self.channels, self.strides)])
        self.norms = nnx.List([nnx.GroupNorm(o, num_groups=8, rngs=rngs) for o in self.channels])
        side = INPUT_SIZE // int(np.prod(self.strides))
        self.trunk = nnx.Linear(side * side * self.channels[-1], hidden, rngs=rngs)
        self.motion_head = nnx.Linear(hidden, mo.MOTION_DIM, rngs=rngs)
        self.attribute_head = nnx.Linear(hidden, NUM_LOGITS, rngs=rngs)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """x: float32 [N, 64, 64, 3] in [-1, 1] -> (motion in [0, 1] units [N, D], logits)."""
        for conv, norm in zip(self.convs, self.norms):
            x = jax.nn.gelu(norm(conv(x)))
        h = jax.nn.gelu(self.trunk(x.reshape(x.shape[0], -1)))
        return self.motion_head(h), self.attribute_head(h)


def preprocess(frames: np.ndarray | jax.Array) -> jax.Array:
    """uint8 [N, H, W, 3] (square, any size) -> float32 [N, 64, 64, 3] in [-1, 1].

    Sizes that are multiples of 64 are box-averaged (exactly what a 64 px render approximates);
    others are resized with an anti-aliased linear filter.
    """
    frames = jnp.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [N, H, W, 3], got {frames.shape}")
    n, h, w, _ = frames.shape
    x = frames.astype(jnp.float32) / 127.5 - 1.0
    if (h, w) == (INPUT_SIZE, INPUT_SIZE):
        return x
    if h % INPUT_SIZE == 0 and w % INPUT_SIZE == 0:
        fh, fw = h // INPUT_SIZE, w // INPUT_SIZE
        return x.reshape(n, INPUT_SIZE, fh, INPUT_SIZE, fw, 3).mean(axis=(2, 4))
    return jax.image.resize(x, (n, INPUT_SIZE, INPUT_SIZE, 3), "linear", antialias=True)


def motion_from_unit(unit: jax.Array) -> jax.Array:
    """Map [0, 1]-normalised head outputs onto ``MOTION_RANGES`` (clipped)."""
    return jnp.clip(mo.MOTION_LOW + jnp.clip(unit, 0, 1) * (mo.MOTION_HIGH - mo.MOTION_LOW),
                    mo.MOTION_LOW, mo.MOTION_HIGH)


def split_logits(logits: jax.Array) -> list[jax.Array]:
    return [logits[..., CLASS_OFFSETS[i]:CLASS_OFFSETS[i + 1]] for i in range(idn.NUM_ATTRIBUTES)]


@dataclasses.dataclass(frozen=True)
class Readout:
    """What the probe sees in each frame."""

    motion: np.ndarray                   # float32 [N, MOTION_DIM]
    attribute_probs: list[np.ndarray]    # per attribute: float32 [N, classes]
    embedding: np.ndarray                # float32 [N, EMBEDDING_DIM], unit norm

    def attributes(self) -> np.ndarray:
        """int32 [N, NUM_ATTRIBUTES]: the most likely class per attribute and frame."""
        return np.stack([p.argmax(-1) for p in self.attribute_probs], -1).astype(np.int32)


@dataclasses.dataclass(frozen=True)
class ClipReadout:
    """A whole clip: per-frame motion plus clip-level attributes and embedding."""

    motion: np.ndarray                   # float32 [T, MOTION_DIM]
    attribute_probs: list[np.ndarray]    # per attribute: float32 [classes], averaged
    attributes: np.ndarray               # int32 [NUM_ATTRIBUTES]
    embedding: np.ndarray                # float32 [EMBEDDING_DIM], unit norm
    frame_embeddings: np.ndarray         # float32 [T, EMBEDDING_DIM]


def _embed(probs: list[np.ndarray]) -> np.ndarray:
    e = np.concatenate(probs, axis=-1)
    return (e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-8)).astype(np.float32)


class Probe:
    """A trained ``ProbeNet`` with a jitted forward pass over frames of any square size."""

    def __init__(self, model: ProbeNet, meta: dict[str, Any] | None = None):
        self.model = model
        self.meta = meta or {}
        graphdef, state = nnx.split(model)

        @jax.jit
        def forward(state, frames):
            net = nnx.merge(graphdef, state)
            unit, logits = net(preprocess(frames))
            return motion_from_unit(unit), [jax.nn.softmax(l, -1) for l in split_logits(logits)]

        self._state = state
        self._forward = forward

    def read(self, frames: np.ndarray, batch: int = 64) -> Readout:
        """Per-frame readings for uint8 [N, H, W, 3]."""
        frames = np.asarray(frames)
        if frames.ndim == 3:
            frames = frames[None]
        motions, probs = [], [[] for _ in range(idn.NUM_ATTRIBUTES)]
        for s in range(0, frames.shape[0], batch):
            chunk = frames[s:s + batch]
            pad = batch - chunk.shape[0] if frames.shape[0] > batch else 0
            if pad:  # keep one compiled shape for long inputs
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
            m, p = self._forward(self._state, chunk)
            keep = chunk.shape[0] - pad
            motions.append(np.asarray(m)[:keep])
            for i, pi in enumerate(p):
                probs[i].append(np.asarray(pi)[:keep])
        attribute_probs = [np.concatenate(p).astype(np.float32) for p in probs]
        return Readout(motion=np.concatenate(motions).astype(np.float32),
                       attribute_probs=attribute_probs, embedding=_embed(attribute_probs))

    def read_clip(self, frames: np.ndarray) -> ClipReadout:
        """Clip-level identity: attributes averaged over the frames that can show them.

        Teeth count only where the probe sees the mouth open, the mark only where it sees the
        head turned, eye colour only where it sees the eyes open; an attribute never shown falls
        back to all frames.
        """
        r = self.read(frames)
        visible = mo.attribute_visibility(r.motion)
        probs = []
        for name, p in zip(idn.ATTRIBUTE_NAMES, r.attribute_probs):
            sel = visible.get(name)
            use = p[sel] if sel is not None and sel.any() else p
            probs.append(use.mean(0))
        return ClipReadout(motion=r.motion, attribute_probs=probs,
                           attributes=np.array([p.argmax() for p in probs], np.int32),
                           embedding=_embed(probs), frame_embeddings=r.embedding)


def save_probe(model: ProbeNet, path: str, meta: dict[str, Any] | None = None,
               dtype=np.float16) -> None:
    """Write the parameters as safetensors (``dtype``; float16 keeps the asset small)."""
    config = {"channels": list(model.channels), "strides": list(model.strides),
              "hidden": model.hidden}
    save_weights(model, path, json.dumps(config), meta, dtype)


def load_probe(path: str | None = None) -> Probe:
    """The shipped probe (or the one at ``path``)."""
    path = path or ASSET_PATH
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"probe weights not found at {path}; train them with "
            "`python -m avatarv_jax.data.avatarworld.probe_train --out {path}`")
    tensors, metadata = read_weights(path)
    config = json.loads(metadata.get("config", "{}"))
    model = load_params(make_probe_net(**config), tensors, path)
    return Probe(model, json.loads(metadata.get("meta", "{}")))


def make_probe_net(channels=(24, 48, 64, 96, 128), strides=DEFAULT_STRIDES, hidden: int = 192,
                   seed: int = 0) -> ProbeNet:
    return ProbeNet(channels=tuple(channels), strides=tuple(strides), hidden=hidden,
                    rngs=nnx.Rngs(seed))


def with_strides(model: ProbeNet, strides: tuple[int, ...]) -> ProbeNet:
    """A copy of ``model`` with other conv strides and the same weights (the shapes do not
    depend on the strides as long as the last feature map stays the same size): a warm start
    for a probe that looks at the full-resolution input before downsampling."""
    out = make_probe_net(model.channels, strides, model.hidden)
    if out.trunk.kernel.shape != model.trunk.kernel.shape:
        raise ValueError(f"strides {strides} change the trunk's input size; the weights of "
                         f"strides {model.strides} do not fit")
    nnx.update(out, nnx.state(model, nnx.Param))
    return out
