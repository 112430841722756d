"""The original SyncNet (Chung & Zisserman 2016, joonson/syncnet_python ``syncnet_v2.model``).

LSE-C / LSE-D numbers in papers (Wav2Lip and everything after it) come from this network and
its protocol, so they are only comparable when computed with it. This module rebuilds its
architecture in Flax NNX (batch norms in inference mode, eps 1e-5), imports its weights from a
local safetensors file, and reproduces its front end:

- video: 5 consecutive colour frames of the face crop, 224 x 224, **BGR** (the original reads
  frames with OpenCV), raw 0-255 values (no scaling, no mean subtraction). The crop follows the
  original's geometry around a face box (``crop_faces``).
- audio: ``python_speech_features.mfcc`` with its defaults at 16 kHz on int16-valued samples:
  no window taper, frames starting at 0 (not centred), cepstral lifter 22, c0 replaced by the
  log frame energy (``original_mfcc``). Window t reads MFCC columns 4t .. 4t+19.
- windows: ``min(T, samples // 640) - 5`` of them, as the original counts.
- offsets: pair with ``lse.sync_score(..., padding="zeros")`` (the original pads the audio
  embeddings with zero vectors); embeddings are not normalised (raw Euclidean distances).
  Sign: ``lse`` reports +k when the lips at frame t match the sound at t + k; syncnet_python
  prints the opposite sign.

Weights. The published file is a pickled PyTorch state dict, which can run code when loaded; we
never unpickle. Convert it once, in your own trusted PyTorch environment::

    import torch
    from safetensors.torch import save_file
    sd = torch.load("syncnet_v2.model", map_location="cpu", weights_only=True)
    sd = {k: v.contiguous() for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    save_file(sd, "syncnet_v2.safetensors")

and load it with ``load_original_syncnet("syncnet_v2.safetensors")``. Tensor names are the
PyTorch state-dict names (``netcnnaud.0.weight``, ``netcnnlip.1.running_var``, ...).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.fft
from flax import nnx

from avatarv_jax.eval import frontends as fe
from avatarv_jax.eval.syncnet import SyncScorer

FACE_SIZE = 224            # side of the face crop the network reads
EMBED_DIM = 1024
BN_EPS = 1e-5              # torch BatchNorm default
CROP_SCALE = 0.4           # run_pipeline.py's --crop_scale: the crop reaches 0.4 box sizes below
CROP_PAD_VALUE = 110       # the grey the original pads frames with before cropping
SAMPLES_PER_FRAME = fe.SAMPLE_RATE // fe.FPS  # 640

# The towers as data: (kind, hyper-parameters). Kinds with parameters keep their position in
# the original nn.Sequential, which is the index in the state-dict names.
# conv: (in, out, kernel, stride, padding); pool: (kernel, stride, padding); bn: (channels,)
AUDIO_CNN = (
    ("conv", 1, 64, (3, 3), (1, 1), (1, 1)), ("bn", 64), ("relu",), ("pool", (1, 1), (1, 1), (0, 0)),
    ("conv", 64, 192, (3, 3), (1, 1), (1, 1)), ("bn", 192), ("relu",),
    ("pool", (3, 3), (1, 2), (0, 0)),
    ("conv", 192, 384, (3, 3), (1, 1), (1, 1)), ("bn", 384), ("relu",),
    ("conv", 384, 256, (3, 3), (1, 1), (1, 1)), ("bn", 256), ("relu",),
    ("conv", 256, 256, (3, 3), (1, 1), (1, 1)), ("bn", 256), ("relu",),
    ("pool", (3, 3), (2, 2), (0, 0)),
    ("conv", 256, 512, (5, 4), (1, 1), (0, 0)), ("bn", 512), ("relu",),
)
LIP_CNN = (
    ("conv", 3, 96, (5, 7, 7), (1, 2, 2), (0, 0, 0)), ("bn", 96), ("relu",),
    ("pool", (1, 3, 3), (1, 2, 2), (0, 0, 0)),
    ("conv", 96, 256, (1, 5, 5), (1, 2, 2), (0, 1, 1)), ("bn", 256), ("relu",),
    ("pool", (1, 3, 3), (1, 2, 2), (0, 1, 1)),
    ("conv", 256, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1)), ("bn", 256), ("relu",),
    ("conv", 256, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1)), ("bn", 256), ("relu",),
    ("conv", 256, 256, (1, 3, 3), (1, 1, 1), (0, 1, 1)), ("bn", 256), ("relu",),
    ("pool", (1, 3, 3), (1, 2, 2), (0, 0, 0)),
    ("conv", 256, 512, (1, 6, 6), (1, 1, 1), (0, 0, 0)), ("bn", 512), ("relu",),
)
FC = (("linear", 512, 512), ("bn", 512), ("relu",), ("linear", 512, EMBED_DIM))
TOWERS = {"netcnnaud": AUDIO_CNN, "netfcaud": FC, "netcnnlip": LIP_CNN, "netfclip": FC}


def _max_pool(x: jax.Array, kernel, stride, padding) -> jax.Array:
    """torch's MaxPool (channels-last, padding counts as -inf, floor division)."""
    pad = ((0, 0),) + tuple((p, p) for p in padding) + ((0, 0),)
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1,) + tuple(kernel) + (1,),
                                 (1,) + tuple(stride) + (1,), pad)


class Sequence(nnx.Module):
    """One of the original nn.Sequential towers, channels-last; ``layers[i]`` is torch's index i
    (``None`` for ReLU and pooling, which carry no parameters)."""

    def __init__(self, spec, *, rngs: nnx.Rngs):
        self.spec = spec
        layers = []
        for op in spec:
            if op[0] == "conv":
                _, cin, cout, kernel, stride, padding = op
                layers.append(nnx.Conv(cin, cout, kernel, strides=stride,
                                       padding=tuple((p, p) for p in padding), rngs=rngs))
            elif op[0] == "bn":
                layers.append(nnx.BatchNorm(op[1], use_running_average=True, epsilon=BN_EPS,
                                            rngs=rngs))
            elif op[0] == "linear":
                layers.append(nnx.Linear(op[1], op[2], rngs=rngs))
            else:
                layers.append(None)
        self.layers = nnx.List(layers)

    def __call__(self, x: jax.Array) -> jax.Array:
        for op, layer in zip(self.spec, self.layers):
            if op[0] == "relu":
                x = jax.nn.relu(x)
            elif op[0] == "pool":
                x = _max_pool(x, *op[1:])
            else:
                x = layer(x)
        return x


class OriginalSyncNet(nnx.Module):
    """``video(x [N, 5, 224, 224, 3])`` (BGR, 0-255) and ``audio(m [N, 13, 20, 1])`` (MFCC x
    time) -> embeddings [N, 1024], not normalised (the protocol uses raw distances)."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.netcnnaud = Sequence(AUDIO_CNN, rngs=rngs)
        self.netfcaud = Sequence(FC, rngs=rngs)
        self.netcnnlip = Sequence(LIP_CNN, rngs=rngs)
        self.netfclip = Sequence(FC, rngs=rngs)

    def video(self, x: jax.Array) -> jax.Array:
        if x.ndim != 5 or x.shape[1:] != (fe.WINDOW_FRAMES, FACE_SIZE, FACE_SIZE, 3):
            raise ValueError(f"video windows must be [N, {fe.WINDOW_FRAMES}, {FACE_SIZE}, "
                             f"{FACE_SIZE}, 3], got {x.shape}")
        h = self.netcnnlip(x)                      # [N, 1, 1, 1, 512]
        return self.netfclip(h.reshape(h.shape[0], -1))

    def audio(self, m: jax.Array) -> jax.Array:
        if m.ndim != 4 or m.shape[1:] != (fe.NUM_MFCC, fe.WINDOW_MFCC, 1):
            raise ValueError(f"audio windows must be [N, {fe.NUM_MFCC}, {fe.WINDOW_MFCC}, 1], "
                             f"got {m.shape}")
        h = self.netcnnaud(m)                      # [N, 1, 1, 512]
        return self.netfcaud(h.reshape(h.shape[0], -1))


def make_original_syncnet(seed: int = 0) -> OriginalSyncNet:
    """Randomly initialised (tests, shapes); real use goes through ``load_original_syncnet``."""
    return OriginalSyncNet(rngs=nnx.Rngs(seed))


def expected_tensors() -> dict[str, tuple[int, ...]]:
    """Every tensor of the original state dict (``num_batches_tracked`` aside): name -> shape."""
    out = {}
    for tower, spec in TOWERS.items():
        for i, op in enumerate(spec):
            p = f"{tower}.{i}."
            if op[0] == "conv":
                out[p + "weight"] = (op[2], op[1]) + tuple(op[3])
                out[p + "bias"] = (op[2],)
            elif op[0] == "linear":
                out[p + "weight"] = (op[2], op[1])
                out[p + "bias"] = (op[2],)
            elif op[0] == "bn":
                for name in ("weight", "bias", "running_mean", "running_var"):
                    out[p + name] = (op[1],)
    return out


def _check(tensors: dict[str, np.ndarray], source: str) -> None:
    expected = expected_tensors()
    for name, shape in expected.items():
        if name not in tensors:
            raise ValueError(f"{source}: tensor {name} is missing (expected shape {shape}); "
                             f"is this the original SyncNet state dict?")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"{source}: tensor {name} has shape {tuple(tensors[name].shape)}, "
                             f"expected {shape}")
    extra = sorted(k for k in tensors if k not in expected
                   and not k.endswith(".num_batches_tracked"))
    if extra:
        raise ValueError(f"{source}: unexpected tensor {extra[0]} ({len(extra)} unexpected in "
                         f"all); the file does not hold the original SyncNet")


def assign_original_weights(model: OriginalSyncNet, tensors: dict[str, np.ndarray],
                            source: str = "weights") -> OriginalSyncNet:
    """Copy PyTorch-named, PyTorch-laid-out arrays into ``model`` (checked first, fp32)."""
    _check(tensors, source)

    def put(var, value):
        var.value = jnp.asarray(np.asarray(value, np.float32))

    for tower, spec in TOWERS.items():
        seq = getattr(model, tower)
        for i, op in enumerate(spec):
            layer, p = seq.layers[i], f"{tower}.{i}."
            if op[0] == "conv":  # [out, in, *k] -> [*k, in, out]
                w = np.asarray(tensors[p + "weight"])
                put(layer.kernel, np.transpose(w, tuple(range(2, w.ndim)) + (1, 0)))
                put(layer.bias, tensors[p + "bias"])
            elif op[0] == "linear":
                put(layer.kernel, np.asarray(tensors[p + "weight"]).T)
                put(layer.bias, tensors[p + "bias"])
            elif op[0] == "bn":
                put(layer.scale, tensors[p + "weight"])
                put(layer.bias, tensors[p + "bias"])
                put(layer.mean, tensors[p + "running_mean"])
                put(layer.var, tensors[p + "running_var"])
    return model


def load_original_syncnet(path: str) -> OriginalSyncNet:
    """The original SyncNet from a safetensors file of its PyTorch state dict (see the module
    docstring for the one-time conversion). Nothing is unpickled."""
    import os

    from avatarv_jax.io.small_weights import read_weights

    if not os.path.isfile(path):
        raise FileNotFoundError(f"original SyncNet weights not found at {path}")
    tensors, _ = read_weights(path)  # ValueError naming the file if it is not safetensors
    _check(tensors, path)
    # Every variable is overwritten, so build the model abstractly (no random init: seconds).
    model = assign_original_weights(nnx.eval_shape(lambda: OriginalSyncNet(rngs=nnx.Rngs(0))),
                                    tensors, path)
    unset = [v for v in jax.tree_util.tree_leaves(nnx.state(model))
             if isinstance(v, jax.ShapeDtypeStruct)]
    if unset:  # the layer table and the model disagree: a bug, not bad input
        raise RuntimeError(f"{len(unset)} variables of OriginalSyncNet were not assigned")
    return model


# ---------------------------------------------------------------------------- front end


def original_mfcc(audio: np.ndarray) -> np.ndarray:
    """float32 [frames, 13]: ``python_speech_features.mfcc(audio, 16000)`` with its defaults.

    ``audio`` is 16 kHz mono in int16 units (as ``scipy.io.wavfile`` reads the original's
    pcm_s16le WAV). Frames of 400 samples every 160, starting at sample 0, the last zero-padded;
    no taper; power spectrum of a 512-point FFT; 26 mel filters (``frontends.mel_filterbank``,
    the same construction); log; orthonormal DCT-II; lifter 22; c0 := log frame energy.
    """
    x = np.asarray(audio, np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"audio must be mono [N] with N > 0, got shape {x.shape}")
    win, hop, n_fft = 400, 160, 512
    x = np.append(x[:1], x[1:] - 0.97 * x[:-1])
    count = 1 if x.size <= win else 1 + int(np.ceil((x.size - win) / hop))
    x = np.pad(x, (0, (count - 1) * hop + win - x.size))
    frames = x[np.arange(count)[:, None] * hop + np.arange(win)[None, :]]
    power = np.abs(np.fft.rfft(frames, n_fft)) ** 2 / n_fft
    tiny = np.finfo(np.float64).eps
    energy = power.sum(1)
    feat = power @ fe.mel_filterbank(26, n_fft, fe.SAMPLE_RATE).T
    feat = np.log(np.where(feat == 0, tiny, feat))
    cep = scipy.fft.dct(feat, type=2, axis=1, norm="ortho")[:, :fe.NUM_MFCC]
    cep = cep * (1 + 11.0 * np.sin(np.pi * np.arange(fe.NUM_MFCC) / 22.0))
    cep[:, 0] = np.log(np.where(energy == 0, tiny, energy))
    return cep.astype(np.float32)


def to_int16_units(audio: np.ndarray) -> np.ndarray:
    """Float audio in [-1, 1] -> the int16 sample values the original's WAV would hold."""
    a = np.asarray(audio)
    if np.issubdtype(a.dtype, np.integer):
        return a.astype(np.float64)
    return np.clip(np.round(a.astype(np.float64) * 32768.0), -32768, 32767)


def _resize_bilinear(img: np.ndarray, height: int, width: int) -> np.ndarray:
    """[..., H, W, C] -> [..., height, width, C]: bilinear at half-pixel centres, no
    anti-aliasing (OpenCV's INTER_LINEAR sampling, which the original uses)."""
    h, w = img.shape[-3:-1]
    ys = np.clip((np.arange(height) + 0.5) * h / height - 0.5, 0, h - 1)
    xs = np.clip((np.arange(width) + 0.5) * w / width - 0.5, 0, w - 1)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, h - 1), np.minimum(x0 + 1, w - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    img = img.astype(np.float32)
    top = img[..., y0, :, :][..., x0, :] * (1 - fx) + img[..., y0, :, :][..., x1, :] * fx
    bot = img[..., y1, :, :][..., x0, :] * (1 - fx) + img[..., y1, :, :][..., x1, :] * fx
    return top * (1 - fy) + bot * fy


def crop_faces(frames: np.ndarray, box: np.ndarray, scale: float = CROP_SCALE) -> np.ndarray:
    """uint8 [T, H, W, 3] and a face box (x0, y0, x1, y1), one per clip ``[4]`` or per frame
    ``[T, 4]`` -> uint8 [T, 224, 224, 3] face crops with the original pipeline's geometry.

    As run_pipeline.py: s = half the box's longer side; the crop spans ``2 (1 + scale) s``
    around the box centre horizontally and ``s`` above to ``(1 + 2 scale) s`` below it
    vertically (it reaches down past the chin); outside the frame is grey 110; bilinear resize.
    (The original also median-filters per-frame boxes over 13 frames; pass smoothed boxes.)
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {frames.shape}")
    t = frames.shape[0]
    boxes = np.broadcast_to(np.asarray(box, np.float64), (t, 4)) if np.ndim(box) == 1 \
        else np.asarray(box, np.float64)
    if boxes.shape != (t, 4) or not np.isfinite(boxes).all():
        raise ValueError(f"box must be finite [4] or [{t}, 4], got {np.shape(box)}")
    out = np.empty((t, FACE_SIZE, FACE_SIZE, 3), np.uint8)
    for i, (x0, y0, x1, y1) in enumerate(boxes):
        s = max(y1 - y0, x1 - x0) / 2
        if s <= 0:
            raise ValueError(f"face box {boxes[i].tolist()} of frame {i} is empty")
        pad = int(s * (1 + 2 * scale))
        img = np.pad(frames[i], ((pad, pad), (pad, pad), (0, 0)), constant_values=CROP_PAD_VALUE)
        cy, cx = (y0 + y1) / 2 + pad, (x0 + x1) / 2 + pad
        face = img[int(cy - s):int(cy + s * (1 + 2 * scale)),
                   int(cx - s * (1 + scale)):int(cx + s * (1 + scale))]
        out[i] = np.clip(np.round(_resize_bilinear(face, FACE_SIZE, FACE_SIZE)), 0, 255)
    return out


def original_windows(faces: np.ndarray, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Face crops uint8 RGB [T, H, W, 3] (resized to 224 if needed) + 16 kHz audio (float in
    [-1, 1] or int16) -> video windows float32 [N, 5, 224, 224, 3] (BGR, 0-255) and audio
    windows float32 [N, 13, 20, 1], with N = min(T, samples // 640) - 5 as the original."""
    faces = np.asarray(faces)
    if faces.ndim != 4 or faces.shape[-1] != 3:
        raise ValueError(f"face crops must be [T, H, W, 3], got {faces.shape}")
    audio = np.asarray(audio)
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono [N], got shape {audio.shape}")
    n = min(faces.shape[0], audio.size // SAMPLES_PER_FRAME) - fe.WINDOW_FRAMES
    if n < 1:
        raise ValueError(f"{faces.shape[0]} frames and {audio.size} samples give no window: "
                         f"the original protocol needs at least {fe.WINDOW_FRAMES + 1} frames "
                         f"of video and audio")
    bgr = faces[:n + fe.WINDOW_FRAMES - 1, ..., ::-1]
    if bgr.shape[1:3] != (FACE_SIZE, FACE_SIZE):
        bgr = np.clip(np.round(_resize_bilinear(bgr, FACE_SIZE, FACE_SIZE)), 0, 255)
    bgr = bgr.astype(np.float32)
    idx = np.arange(n)[:, None] + np.arange(fe.WINDOW_FRAMES)[None, :]
    mfccs = original_mfcc(to_int16_units(audio))
    return bgr[idx], fe.audio_windows(mfccs, n)


class OriginalSyncScorer(SyncScorer):
    """``SyncScorer``'s interface for the original network: ``crop(frames, face_box)``, then
    ``embed(face_crops, audio)`` -> per-window embeddings; ``lse.clip_sync`` runs the chain
    with the original's zero padding."""

    padding = "zeros"

    def __init__(self, model: OriginalSyncNet, batch: int = 16):
        super().__init__(model, batch)

    def _batched(self, fn, x: np.ndarray) -> np.ndarray:
        """Full batches, then the rest padded to the next power of two: few compiled shapes,
        and a short clip does not pay for a whole batch of 224 px windows."""
        full = x.shape[0] - x.shape[0] % self.batch
        outs = [super()._batched(fn, x[:full])] if full else []
        rest = x[full:]
        if rest.shape[0]:
            size = 1 << (rest.shape[0] - 1).bit_length()
            pad = np.zeros((size - rest.shape[0],) + rest.shape[1:], rest.dtype)
            out = fn(self._state, jnp.asarray(np.concatenate([rest, pad])))
            outs.append(np.asarray(out)[:rest.shape[0]].astype(np.float32))
        return np.concatenate(outs)

    def crop(self, frames: np.ndarray, box: np.ndarray) -> np.ndarray:
        return crop_faces(frames, box)

    def embed(self, crops: np.ndarray, audio: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        vw, aw = original_windows(crops, audio)
        return self._batched(self._video, vw), self._batched(self._audio, aw)
