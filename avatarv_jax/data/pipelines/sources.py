"""Shard sets on disk and the random-access sources the Grain loader samples from.

A shard set is a directory with ``manifest.json`` and the ArrayRecord files it lists (in
order: record ``i`` of the set is the ``i``-th record across the shards). Three kinds share this
layout: AvatarWorld (``avatarworld-arrayrecord``), real-video ingestion, and latent shards
(``avatarv-latents``, written by ``avatarv_jax.data.latents``). Records are npz bytes, read
with ``allow_pickle=False``; only the keys a stage needs are decompressed.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from avatarv_jax.data.shard_reader import MANIFEST, read_manifest

LATENT_FORMAT = "avatarv-latents"


class ShardSet:
    """The manifest and shard paths of one directory, checked against each other."""

    def __init__(self, directory: str):
        path = os.path.join(directory, MANIFEST)
        self.manifest: dict[str, Any] = read_manifest(directory, "a finished shard set")
        shards = self.manifest.get("shards")
        if not shards:
            raise ValueError(f"{path} lists no shards")
        self.directory = directory
        self.paths = [os.path.join(directory, s["path"]) for s in shards]
        missing = [p for p in self.paths if not os.path.isfile(p)]
        if missing:
            raise FileNotFoundError(f"shard(s) named in {path} are missing: {missing[:3]}")
        self.num_records = int(sum(s["num_records"] for s in shards))

    @property
    def format(self) -> str:
        return str(self.manifest.get("format", ""))

    @property
    def is_latent(self) -> bool:
        return self.format == LATENT_FORMAT

    def clips(self) -> list[dict[str, Any]]:
        """Per-clip manifest entries (of the source clips for a latent set)."""
        key = "source_clips" if self.is_latent else "clips"
        clips = self.manifest.get(key)
        if clips is None:
            raise ValueError(f"{self.directory}/{MANIFEST} has no '{key}' list; the pipelines "
                             "need per-clip num_frames")
        return clips

    def clip_frames(self) -> np.ndarray:
        """int64 [clips]: frames per clip."""
        try:
            return np.asarray([int(c["num_frames"]) for c in self.clips()], np.int64)
        except KeyError as e:
            raise ValueError(f"{self.directory}/{MANIFEST}: a clip entry lacks {e}") from None


def decode_record(data: bytes, keys: Sequence[str], where: str = "record") -> dict[str, np.ndarray]:
    """The named arrays of one npz record (no pickle); a missing key is a clear error."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        missing = [k for k in keys if k not in z.files]
        if missing:
            raise KeyError(f"{where} lacks {missing} (it has {sorted(z.files)})")
        return {k: z[k] for k in keys}


class RecordReader:
    """Random access to the raw records of a shard set; picklable (Grain workers reopen it)."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)
        self._source = None

    def read(self, index: int, keys: Sequence[str]) -> dict[str, np.ndarray]:
        if self._source is None:
            self._source = grain.sources.ArrayRecordDataSource(self.paths)
        return decode_record(self._source[int(index)], keys, f"record {int(index)}")

    def __getstate__(self):
        return {"paths": self.paths, "_source": None}


class ExampleIndex:
    """The loader's data source: example ``i`` is row ``i`` of ``items`` (record/clip ids).

    Reading happens in the stage transform, which makes every random choice (windows,
    crops, reference windows) from Grain's per-example generator.
    """

    def __init__(self, items: np.ndarray):
        self.items = np.asarray(items, np.int64)
        if self.items.ndim != 2:
            raise ValueError(f"items must be [N, R], got {self.items.shape}")

    def __len__(self) -> int:
        return int(self.items.shape[0])

    def __getitem__(self, index: int) -> np.ndarray:
        return self.items[int(index)]

    def __repr__(self) -> str:  # Grain logs the source
        return f"ExampleIndex({self.items.shape[0]} examples x {self.items.shape[1]} ids)"


class ClipWindows:
    """Latent sets: the window records of each source clip (CSR layout, picklable arrays)."""

    def __init__(self, window_clip: np.ndarray, num_clips: int):
        window_clip = np.asarray(window_clip, np.int64)
        self.order = np.argsort(window_clip, kind="stable")
        self.offsets = np.searchsorted(window_clip[self.order], np.arange(num_clips + 1))

    def count(self, clip: int) -> int:
        return int(self.offsets[clip + 1] - self.offsets[clip])

    def pick(self, clip: int, rng: np.random.Generator) -> int:
        n = self.count(clip)
        if n == 0:
            raise ValueError(f"source clip {clip} has no latent window")
        return int(self.order[self.offsets[clip] + rng.integers(n)])
