"""Human preference pairs (a JSONL manifest) as a Grain pipeline of DPO batches.

Each manifest line (``posttrain.dpo.read_preference_manifest``) names a reference clip, the
driving audio, and two videos generated for them, one preferred by the annotator. An example
decodes the four files with PyAV (``inference.media``: 25 fps, covered and centre-cropped to
``data.resolution``, audio at 16 kHz) and keeps the first ``data.frames`` frames of both
videos (and of the audio) and the first ``data.ref_frames`` of the reference. Batches follow
the SFT contract (``data/pipelines``) with the *preferred* video as ``video``, so every frozen
encoder runs exactly as in the other stages, plus the rejected side:

=================  ==========================================================================
``video``          uint8 [B, T, H, W, 3] the preferred video
``rejected_video`` uint8 [B, T, H, W, 3]
``motion``         float32 [B, T, M] of the preferred video, ``rejected_motion`` of the
                   rejected one, ``ref_motion`` [B, Tr, M]: each from the video's
                   ``<name>.motion.npz`` sidecar (or a registered extractor,
                   ``inference.motion_source``), zeros when there is none
``audio``          float32 [B, T * 640] the driving audio, ``ref_audio`` [B, Tr * 640] the
                   reference clip's own sound (zeros when it has none)
``ref_video``      uint8 [B, Tr, H, W, 3]
``text_ids``       int32 [B, L] / ``text_mask`` bool [B, L]: the caption ("" when absent)
``identity_id``    int32 [B], -1 (unknown)
=================  ==========================================================================

The clean latents of both videos are encoded by the frozen VAE inside the jitted DPO step,
like every other stage's video: the pipeline stays host-only numpy (no VAE weights in Grain
workers, no second copy of the VAE), and the pixels stay available for rewards and samples.

Built on the Grain dataset API (shard per host, shuffle per epoch, map, batch): the iterator
state is checkpointable, so the stage resumes exactly like the others.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import grain
import numpy as np

from avatarv_jax.inference.errors import InferenceInputError
from avatarv_jax.inference.media import FPS, SAMPLE_RATE, read_audio, read_video
from avatarv_jax.inference.motion_source import reference_motion
from avatarv_jax.models.tokenizer import make_tokenizer
from avatarv_jax.posttrain.dpo import (
    PreferenceManifestError,
    PreferencePair,
    read_preference_manifest,
)

SAMPLES_PER_FRAME = SAMPLE_RATE // FPS    # 640


class PreferenceDataError(ValueError):
    """A manifest entry whose files cannot be used (unreadable, too short); names the line's
    file and the problem."""


@dataclasses.dataclass
class PreferenceExample:
    """One manifest pair -> the un-batched dict of the module docstring's contract."""

    frames: int
    ref_frames: int
    resolution: int
    text_length: int
    motion_dim: int
    tokenizer_path: str = ""

    def __post_init__(self):
        self._tokenizer = None

    def __getstate__(self):               # SentencePiece objects do not pickle
        return dict(self.__dict__, _tokenizer=None)

    def _video(self, path: str, count: int, what: str) -> tuple[np.ndarray, np.ndarray | None]:
        size = (self.resolution, self.resolution)
        try:
            clip = read_video(path, size, max_frames=count, what=what)
        except InferenceInputError as e:
            raise PreferenceDataError(str(e)) from None
        if clip.frames.shape[0] < count:
            raise PreferenceDataError(f"{what} {path} has {clip.frames.shape[0]} frames at 25 fps; "
                                      f"the pairs need at least {count} (data.frames / "
                                      "data.ref_frames)")
        return clip.frames, clip.audio

    def _motion(self, frames: np.ndarray, path: str) -> np.ndarray:
        return reference_motion(frames, Path(path), self.motion_dim).motion

    def __call__(self, pair: PreferencePair) -> dict[str, np.ndarray]:
        t, tr = self.frames, self.ref_frames
        preferred, _ = self._video(pair.preferred, t, "preferred video")
        rejected, _ = self._video(pair.rejected, t, "rejected video")
        ref, ref_sound = self._video(pair.reference, tr, "reference video")
        try:
            wave = read_audio(pair.audio).wave
        except InferenceInputError as e:
            raise PreferenceDataError(str(e)) from None
        if wave.shape[0] < t * SAMPLES_PER_FRAME:
            raise PreferenceDataError(
                f"driving audio {pair.audio} lasts {wave.shape[0] / SAMPLE_RATE:.3f} s; "
                f"{t} frames need {t / FPS:.3f} s")
        ref_audio = np.zeros(tr * SAMPLES_PER_FRAME, np.float32)
        if ref_sound is not None:
            n = min(ref_sound.shape[0], ref_audio.shape[0])
            ref_audio[:n] = ref_sound[:n]
        if self._tokenizer is None:
            self._tokenizer = make_tokenizer(self.tokenizer_path or None)
        ids, mask = self._tokenizer.encode([pair.caption or ""], self.text_length)
        return {
            "video": preferred, "rejected_video": rejected,
            "motion": self._motion(preferred, pair.preferred),
            "rejected_motion": self._motion(rejected, pair.rejected),
            "audio": np.ascontiguousarray(wave[:t * SAMPLES_PER_FRAME], np.float32),
            "ref_video": ref, "ref_audio": ref_audio,
            "ref_motion": self._motion(ref, pair.reference),
            "text_ids": ids[0].astype(np.int32), "text_mask": mask[0].astype(bool),
            "identity_id": np.int32(-1),
        }


def preference_dataset(manifest: str, *, batch_size: int, frames: int, ref_frames: int,
                       resolution: int, text_length: int, motion_dim: int, seed: int,
                       tokenizer_path: str = "", shuffle: bool = True, num_epochs: int = 0,
                       process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Batches of preference pairs (the module docstring's contract) as a Grain IterDataset;
    ``num_epochs`` 0 repeats forever. Each host reads a disjoint slice of the pairs."""
    pairs = read_preference_manifest(manifest)
    if (frames - 1) % 4 or (ref_frames - 1) % 4:
        raise ValueError(f"data.frames ({frames}) and data.ref_frames ({ref_frames}) must be "
                         "1 + 4k (the causal VAE)")
    if resolution <= 0 or resolution % 2:
        raise ValueError(f"data.resolution must be a positive even size, got {resolution}")
    if batch_size < 1 or batch_size % process_count:
        raise ValueError(f"data.batch_size {batch_size} must be a positive multiple of the "
                         f"{process_count} host(s)")
    per_host = batch_size // process_count
    ds = grain.MapDataset.source(pairs)[process_index::process_count]
    if len(ds) < per_host:
        raise PreferenceManifestError(f"{manifest}: {len(pairs)} pair(s) cannot fill a batch of "
                                      f"{per_host} on each of {process_count} host(s)")
    if shuffle:
        ds = ds.shuffle(seed=seed)
    ds = ds.repeat(num_epochs or None)
    example = PreferenceExample(frames=frames, ref_frames=ref_frames, resolution=resolution,
                                text_length=text_length, motion_dim=motion_dim,
                                tokenizer_path=tokenizer_path)
    return ds.map(example).batch(per_host, drop_remainder=True).to_iter_dataset()


def make_preference_pipeline(cfg, *, process_index: int = 0,
                             process_count: int = 1) -> grain.IterDataset:
    """The dpo stage's data when ``dpo.pairs`` names a manifest (the trainer's ``make_data``)."""
    d = cfg.data
    return preference_dataset(
        str(cfg.dpo.pairs), batch_size=int(d.batch_size), frames=int(d.frames),
        ref_frames=int(d.ref_frames), resolution=int(d.resolution),
        text_length=int(d.text_length), motion_dim=int(cfg.model.motion_dim),
        seed=int(cfg.train.seed), tokenizer_path=str(d.get("tokenizer", "") or ""),
        shuffle=bool(d.get("shuffle", True)), num_epochs=int(d.get("num_epochs", 0) or 0),
        process_index=process_index, process_count=process_count)
