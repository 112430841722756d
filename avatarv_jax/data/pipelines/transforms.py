"""Per-example work of the pipelines: read records, pick windows and crops, tokenise.

One ``StageExample`` (a Grain ``RandomMap``) turns an example id row into the un-batched dict
of the batch contract (``pipelines/__init__.py``). Every random choice comes from the
generator Grain derives from the seed and the example's position, so two loaders with one
seed agree and a restored iterator continues exactly.
"""

from __future__ import annotations

import dataclasses
import functools

import grain
import numpy as np

from avatarv_jax.data.pipelines.sources import ClipWindows, RecordReader
from avatarv_jax.models.tokenizer import make_tokenizer

SAMPLES_PER_FRAME = 640  # 16 kHz audio, 25 fps video
MASKS = ("mask_face", "mask_mouth", "mask_eyes")


# ---- geometry ---------------------------------------------------------------------------------

def crop_box(rng: np.random.Generator, height: int, width: int,
             scale: tuple[float, float]) -> tuple[int, int, int]:
    """(top, left, side) of a random square crop whose side is ``scale`` x the shorter side."""
    short = min(height, width)
    lo, hi = scale
    side = short if lo == hi == 1.0 else int(round(short * rng.uniform(lo, hi)))
    side = max(1, min(short, side))
    top = int(rng.integers(height - side + 1))
    left = int(rng.integers(width - side + 1))
    return top, left, side


@functools.lru_cache(maxsize=32)
def resize_weights(n_in: int, n_out: int) -> np.ndarray:
    """float32 [n_out, n_in]: linear interpolation, widened by the scale when shrinking.

    The triangle filter of PIL's BILINEAR (anti-aliased): output pixel centres map to input
    coordinates, each row sums to one.
    """
    scale = n_in / n_out
    support = max(1.0, scale)
    centres = (np.arange(n_out) + 0.5) * scale - 0.5
    dist = np.abs(np.arange(n_in)[None, :] - centres[:, None]) / support
    w = np.maximum(0.0, 1.0 - dist)
    return (w / w.sum(1, keepdims=True)).astype(np.float32)


def crop_resize_video(frames: np.ndarray, box: tuple[int, int, int], out: int) -> np.ndarray:
    """uint8 [T, H, W, 3] -> uint8 [T, out, out, 3]: crop the box, resize anti-aliased."""
    top, left, side = box
    x = frames[:, top:top + side, left:left + side]
    if side == out:
        return np.ascontiguousarray(x)
    w = resize_weights(side, out)
    x = np.einsum("oy,tyxc->toxc", w, x.astype(np.float32))
    x = np.einsum("px,toxc->topc", w, x)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def crop_resize_mask(mask: np.ndarray, box: tuple[int, int, int], out: int) -> np.ndarray:
    """bool [T, H, W] -> bool [T, out, out]: crop the box, nearest-neighbour resize."""
    top, left, side = box
    x = mask[:, top:top + side, left:left + side]
    if side == out:
        return np.ascontiguousarray(x)
    idx = np.minimum(((np.arange(out) + 0.5) * side / out).astype(np.int64), side - 1)
    return x[:, idx][:, :, idx]


# ---- the stage transform ----------------------------------------------------------------------

@dataclasses.dataclass
class StageExample(grain.transforms.RandomMap):
    """Example id row -> one example of ``stage`` (pixels or latents)."""

    stage: str
    reader: RecordReader
    frames: int
    ref_frames: int
    resolution: int
    crop_scale: tuple[float, float]
    text_length: int
    tokenizer_path: str
    windows: ClipWindows | None = None      # latent mode: the window records of each clip
    latent_ratio: int = 4                   # video frames per latent frame (after the first)
    audio_context: int = 0                  # video frames of audio either side of the GEN clip

    def __post_init__(self):
        self._tokenizer = None

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokenizer"] = None          # SentencePiece objects do not pickle; rebuilt lazily
        return state

    @property
    def latent(self) -> bool:
        return self.windows is not None

    def _text(self, caption) -> dict[str, np.ndarray]:
        if self._tokenizer is None:
            self._tokenizer = make_tokenizer(self.tokenizer_path or None)
        ids, mask = self._tokenizer.encode([str(caption)], self.text_length)
        return {"text_ids": ids[0], "text_mask": mask[0]}

    def _latent_frames(self, frames: int) -> int:
        return 1 + (frames - 1) // self.latent_ratio

    def random_map(self, element: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        if self.latent:
            return self._latent_example(element, rng)
        return self._pixel_example(element, rng)

    # pixels

    def _window(self, clip: dict, length: int, rng: np.random.Generator) -> int:
        total = clip["frames"].shape[0]
        if total < length:
            raise ValueError(f"clip of {total} frames is shorter than the {length} asked for")
        return int(rng.integers(total - length + 1))

    def _video(self, frames: np.ndarray, box) -> np.ndarray:
        return crop_resize_video(frames, box, self.resolution or box[2])

    def _pixel_example(self, element: np.ndarray, rng: np.random.Generator) -> dict:
        keys = ["frames", "caption", "identity_id"]
        if self.stage != "t2v":
            keys.append("audio")
        if self.stage == "sft":
            keys += ["motion", *MASKS]
        clip = self.reader.read(element[0], keys)
        t = self.frames
        s = self._window(clip, t, rng)
        h, w = clip["frames"].shape[1:3]
        box = crop_box(rng, h, w, self.crop_scale)
        out = {"video": self._video(clip["frames"][s:s + t], box), **self._text(clip["caption"]),
               "identity_id": np.int32(clip["identity_id"])}
        if self.stage == "t2v":
            return out
        out["audio"] = _audio(clip["audio"], s, t, self.audio_context)
        if self.stage == "a2v":
            r = int(rng.integers(clip["frames"].shape[0]))
            out["ref_video"] = self._video(clip["frames"][r:r + 1], box)
            return out
        size = self.resolution or box[2]
        out["motion"] = clip["motion"][s:s + t].astype(np.float32)
        for m in MASKS:
            out[m] = crop_resize_mask(clip[m][s:s + t].astype(bool), box, size)
        ref = self.reader.read(element[1], ["frames", "audio", "motion"])
        tr = self.ref_frames
        sr = self._window(ref, tr, rng)
        ref_box = crop_box(rng, *ref["frames"].shape[1:3], self.crop_scale)
        out["ref_video"] = crop_resize_video(ref["frames"][sr:sr + tr], ref_box, size)
        out["ref_audio"] = _audio(ref["audio"], sr, tr)
        out["ref_motion"] = ref["motion"][sr:sr + tr].astype(np.float32)
        return out

    # latents

    def _latent_example(self, element: np.ndarray, rng: np.random.Generator) -> dict:
        t, f = self.frames, self._latent_frames(self.frames)
        keys = ["latents", "caption", "identity_id", "clip_index"]
        if self.stage != "t2v":
            keys.append("audio")
        if self.stage == "sft":
            keys += ["motion", *MASKS]
            window = self.windows.pick(int(element[0]), rng)
        else:
            window = int(element[0])
        rec = self.reader.read(window, keys)
        out = {"latents": rec["latents"][:f].astype(np.float32), **self._text(rec["caption"]),
               "identity_id": np.int32(rec["identity_id"])}
        if self.stage == "t2v":
            return out
        # A latent-mode record holds its window's audio only: the context is zeros.
        out["audio"] = _audio(rec["audio"], 0, t, self.audio_context)
        if self.stage == "a2v":
            # A causal VAE's first latent frame encodes the window's first video frame alone:
            # exactly the latent of that single frame.
            other = self.windows.pick(int(rec["clip_index"]), rng)
            out["ref_latents"] = self.reader.read(other, ["latents"])["latents"][:1]
            return out
        out["motion"] = rec["motion"][:t].astype(np.float32)
        for m in MASKS:
            out[m] = rec[m][:t].astype(bool)
        tr = self.ref_frames
        ref = self.reader.read(self.windows.pick(int(element[1]), rng),
                               ["latents", "audio", "motion"])
        out["ref_latents"] = ref["latents"][:self._latent_frames(tr)].astype(np.float32)
        out["ref_audio"] = _audio(ref["audio"], 0, tr)
        out["ref_motion"] = ref["motion"][:tr].astype(np.float32)
        return out


def _audio(audio: np.ndarray, start: int, frames: int, context: int = 0) -> np.ndarray:
    """The audio samples under video frames ``start - context .. start + frames + context``,
    zero outside the clip: ``context`` frames either side, as inference encodes a chunk's audio
    (``inference.audio_context_frames``), so the frozen audio encoder sees the same window."""
    lo, hi = (start - context) * SAMPLES_PER_FRAME, (start + frames + context) * SAMPLES_PER_FRAME
    a = np.asarray(audio, np.float32)
    out = np.zeros(hi - lo, np.float32)
    i, j = max(lo, 0), min(hi, a.shape[0])
    if j > i:
        out[i - lo:j - lo] = a[i:j]
    return out
