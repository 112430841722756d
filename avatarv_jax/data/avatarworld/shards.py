"""AvatarWorld on disk: ArrayRecord shards of clips plus a JSON manifest.

One record is one clip, serialised as the bytes of an ``.npz`` archive (numpy's zip of ``.npy``
files, read back with ``allow_pickle=False``, so a record can never run code). Keys:

    frames            uint8   [T, H, W, 3]
    motion            float32 [T, MOTION_DIM]
    mask_face, mask_mouth, mask_eyes   bool [T, H, W]
    audio             float32 [T * 640]   (16 kHz mono)
    static_attributes int32   [NUM_ATTRIBUTES]
    dynamic_style     float32 [DYNAMIC_STYLE_DIM]
    identity_id, scene_id, seed        int64 scalars
    caption, language, transcript, speech_backend   unicode scalars
    format_version    int64 scalar (RECORD_VERSION)

Shards use ``group_size:1`` so every record can be read on its own (Grain's random access).
``manifest.json`` is written last: a directory without it is not a finished data set.
"""

from __future__ import annotations

import io
import json
import os
from typing import Any, Iterator

import numpy as np

from avatarv_jax.data.avatarworld import identity as idn
from avatarv_jax.data.avatarworld import motion as mo
from avatarv_jax.data.avatarworld import render as rnd
from avatarv_jax.data.avatarworld import speech
from avatarv_jax.data.avatarworld.clip import Clip
from avatarv_jax.data.shard_reader import MANIFEST, ShardedRecords, array_record_module

RECORD_VERSION = 1
WRITER_OPTIONS = "group_size:1,zstd:3"
MASK_NAMES = ("face", "mouth", "eyes")
_STRINGS = ("caption", "language", "transcript", "speech_backend")
_INTS = ("identity_id", "scene_id", "seed")


def clip_to_bytes(clip: Clip) -> bytes:
    """Serialise a clip as npz bytes (no pickle)."""
    arrays: dict[str, np.ndarray] = {
        "frames": np.asarray(clip.frames, np.uint8),
        "motion": np.asarray(clip.motion, np.float32),
        "audio": np.asarray(clip.audio, np.float32),
        "static_attributes": np.asarray(clip.static_attributes, np.int32),
        "dynamic_style": np.asarray(clip.dynamic_style, np.float32),
        "format_version": np.int64(RECORD_VERSION),
    }
    for name in MASK_NAMES:
        arrays[f"mask_{name}"] = np.asarray(clip.masks[name], bool)
    for name in _INTS:
        arrays[name] = np.int64(getattr(clip, name))
    for name in _STRINGS:
        arrays[name] = np.array(getattr(clip, name), dtype=np.str_)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def clip_from_bytes(data: bytes) -> Clip:
    """Inverse of ``clip_to_bytes``; refuses records of another format version."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        version = int(z["format_version"])
        if version != RECORD_VERSION:
            raise ValueError(f"record format version {version} is not {RECORD_VERSION}")
        return Clip(frames=z["frames"], motion=z["motion"],
                    masks={n: z[f"mask_{n}"] for n in MASK_NAMES}, audio=z["audio"],
                    identity_id=int(z["identity_id"]), static_attributes=z["static_attributes"],
                    dynamic_style=z["dynamic_style"], scene_id=int(z["scene_id"]),
                    caption=str(z["caption"]), language=str(z["language"]),
                    transcript=str(z["transcript"]), seed=int(z["seed"]),
                    speech_backend=str(z["speech_backend"]))


def describe_world() -> dict[str, Any]:
    """The schema part of a manifest: what each number in a record means."""
    return {
        "fps": speech.FPS, "sample_rate": speech.SAMPLE_RATE,
        "motion_fields": list(mo.MOTION_FIELDS),
        "motion_ranges": {k: list(v) for k, v in mo.MOTION_RANGES.items()},
        "static_attributes": {k: list(v) for k, v in idn.STATIC_ATTRIBUTES.items()},
        "dynamic_style_fields": list(idn.DYNAMIC_STYLE_FIELDS),
        "dynamic_style_ranges": {k: list(v) for k, v in idn.DYNAMIC_STYLE_RANGES.items()},
        "heldout_rule": f"id % {idn.HELDOUT_MODULUS} == {idn.HELDOUT_MODULUS - 1}",
        "world_seed": idn.WORLD_SEED,
        "renderer_version": rnd.RENDERER_VERSION,
    }


class ShardWriter:
    """Writes clips into ``directory`` as numbered shards; ``close`` writes the manifest."""

    def __init__(self, directory: str, clips_per_shard: int = 64, prefix: str = "avatarworld"):
        if clips_per_shard < 1:
            raise ValueError(f"clips_per_shard must be >= 1, got {clips_per_shard}")
        os.makedirs(directory, exist_ok=True)
        if os.path.exists(os.path.join(directory, MANIFEST)):
            raise FileExistsError(f"{directory} already holds a data set ({MANIFEST} exists)")
        self.directory = directory
        self.clips_per_shard = clips_per_shard
        self.prefix = prefix
        self.shards: list[dict[str, Any]] = []
        self.clips: list[dict[str, Any]] = []
        self.bytes_written = 0
        self._writer = None
        self._resolution: int | None = None

    def _open_next(self) -> None:
        name = f"{self.prefix}-{len(self.shards):05d}.array_record"
        self._writer = array_record_module().ArrayRecordWriter(os.path.join(self.directory, name),
                                                         WRITER_OPTIONS)
        self.shards.append({"path": name, "num_records": 0})

    def add(self, clip: Clip) -> None:
        if self._resolution is None:
            self._resolution = clip.resolution
        elif clip.resolution != self._resolution:
            raise ValueError(f"all clips of a data set share one resolution: "
                             f"{clip.resolution} != {self._resolution}")
        if self._writer is None or self.shards[-1]["num_records"] >= self.clips_per_shard:
            self._finish_shard()
            self._open_next()
        data = clip_to_bytes(clip)
        self._writer.write(data)
        self.bytes_written += len(data)
        self.shards[-1]["num_records"] += 1
        self.clips.append({"identity_id": clip.identity_id, "scene_id": clip.scene_id,
                           "seed": clip.seed, "language": clip.language,
                           "num_frames": clip.num_frames, "split": clip.split,
                           "caption": clip.caption})

    def _finish_shard(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def close(self, extra: dict[str, Any] | None = None) -> dict[str, Any]:
        """Close the last shard and write ``manifest.json`` (through a temporary name)."""
        self._finish_shard()
        manifest = {"format": "avatarworld-arrayrecord", "record_version": RECORD_VERSION,
                    "record_encoding": "npz (numpy zip, no pickle)",
                    "writer_options": WRITER_OPTIONS, "resolution": self._resolution,
                    "num_clips": len(self.clips), "shards": self.shards, "clips": self.clips,
                    **describe_world(), **(extra or {})}
        tmp = os.path.join(self.directory, MANIFEST + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, ensure_ascii=False)
        os.replace(tmp, os.path.join(self.directory, MANIFEST))
        return manifest


def _check_manifest(manifest: dict[str, Any], path: str) -> None:
    if manifest.get("record_version") != RECORD_VERSION:
        raise ValueError(f"{path}: record_version {manifest.get('record_version')} "
                         f"is not {RECORD_VERSION}")


class AvatarWorldDataset(ShardedRecords):
    """Random access to the clips of a written data set: ``len(ds)``, ``ds[i] -> Clip``."""

    def __init__(self, directory: str):
        super().__init__(directory, "an AvatarWorld data set", _check_manifest)

    def __getitem__(self, index: int) -> Clip:
        return clip_from_bytes(self.raw(index))

    def __iter__(self) -> Iterator[Clip]:
        for i in range(len(self)):
            yield self[i]

