"""The on-disk form of ingested footage: one ArrayRecord shard per source video, plus JSON.

Layout of an output directory::

    shards/<key>.array_record   the clips of one source (key = first 16 hex of its sha256)
    sources/<key>.json          that source's summary, written after its shard: "done" marker
    ingest_config.json          the IngestConfig every source was processed with
    identity_graph.npz          the cross-clip identity graph (identity_graph.IdentityGraph)
    manifest.json               written last: the data set (a directory without it is unfinished)

One record is one clip as ``.npz`` bytes (read back with ``allow_pickle=False``). Keys: the core
schema shared with AvatarWorld (``frames`` uint8 [T,H,W,3], ``motion`` float32 [T, REAL_MOTION_DIM],
``mask_face/mask_mouth/mask_eyes`` bool [T,H,W], ``audio`` float32 [T*640], ``caption``,
``identity_id`` (-1: unknown), ``scene_id`` (-1)), plus ``clip_id``, ``source``, ``start_frame``,
``landmarks`` float32 [T,68,2], ``face_boxes`` float32 [T,4], ``face_embedding`` float32 [128],
``background`` float32 [K] and ``format_version``.

Every file is written under a temporary name and renamed, through a small ``Storage`` interface
so that the Beam runner can put the same bytes on any Beam file system (GCS, HDFS, S3).
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from collections.abc import Iterable
from typing import Any, Protocol

import numpy as np

from avatarv_jax.data.ingest.config import FPS, SAMPLE_RATE, IngestConfig
from avatarv_jax.data.ingest.landmark_motion import REAL_MOTION_DIM, REAL_MOTION_FIELDS
from avatarv_jax.data.ingest.process import Clip, SourceResult, source_key
from avatarv_jax.data.shard_reader import MANIFEST, ShardedRecords, array_record_module

RECORD_VERSION = 1
FORMAT = "avatarv-ingest-arrayrecord"
CONFIG_FILE = "ingest_config.json"
GRAPH_FILE = "identity_graph.npz"
SHARD_DIR, SOURCE_DIR = "shards", "sources"
WRITER_OPTIONS = "group_size:1,zstd:3"
_STRINGS = ("caption", "clip_id", "source")
_INTS = ("identity_id", "scene_id", "start_frame")


class Storage(Protocol):
    """Where outputs go: paths are joined with ``join`` and written atomically."""

    def join(self, *parts: str) -> str: ...
    def exists(self, path: str) -> bool: ...
    def read_text(self, path: str) -> str: ...
    def write_bytes(self, path: str, data: bytes) -> None: ...


class LocalStorage:
    """The local file system: temporary name in the same directory, then ``os.replace``."""

    def join(self, *parts: str) -> str:
        return os.path.join(*parts)

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def read_text(self, path: str) -> str:
        with open(path, encoding="utf-8") as f:
            return f.read()

    def write_bytes(self, path: str, data: bytes) -> None:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        tmp = f"{path}.partial-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def clip_to_bytes(clip: Clip) -> bytes:
    """npz bytes of one record (no pickle)."""
    arrays = dict(clip.arrays)
    arrays["format_version"] = np.int64(RECORD_VERSION)
    for name in _INTS:
        arrays[name] = np.int64(clip.meta.get(name, -1))
    for name in _STRINGS:
        arrays[name] = np.array(clip.meta[name], dtype=np.str_)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def record_from_bytes(data: bytes) -> dict[str, Any]:
    """Inverse of ``clip_to_bytes``: numpy arrays, Python ints and strings."""
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        version = int(z["format_version"])
        if version != RECORD_VERSION:
            raise ValueError(f"record format version {version} is not {RECORD_VERSION}")
        out: dict[str, Any] = {k: z[k] for k in z.files}
    for name in _INTS:
        out[name] = int(out[name])
    for name in _STRINGS:
        out[name] = str(out[name])
    return out


def shard_bytes(clips: list[Clip]) -> bytes:
    """The ArrayRecord file holding ``clips`` (written to a local temporary file, read back)."""
    with tempfile.TemporaryDirectory(prefix="ingest-shard-") as tmp:
        path = os.path.join(tmp, "shard.array_record")
        writer = array_record_module().ArrayRecordWriter(path, WRITER_OPTIONS)
        for clip in clips:
            writer.write(clip_to_bytes(clip))
        writer.close()
        with open(path, "rb") as f:
            return f.read()


def motion_sums(clips: list[Clip]) -> dict[str, Any]:
    """Per-field count, sum and sum of squares of the motion vectors (for data-set statistics)."""
    m = np.concatenate([c.arrays["motion"] for c in clips]) if clips else \
        np.zeros((0, REAL_MOTION_DIM), np.float64)
    m = m.astype(np.float64)
    return {"count": len(m), "sum": m.sum(0).tolist(), "sumsq": (m * m).sum(0).tolist()}


def source_summary(result: SourceResult) -> dict[str, Any]:
    """The ``sources/<key>.json`` document of a processed source."""
    key = source_key(result.digest)
    return {"source": result.source, "sha256": result.digest, "status": result.status,
            "error": result.error, "num_frames": result.num_frames, "num_shots": result.num_shots,
            "rejected": result.rejected,
            "shard": (f"{SHARD_DIR}/{key}.array_record" if result.clips else None),
            "clips": [c.meta for c in result.clips], "motion_sums": motion_sums(result.clips)}


def write_source(storage: Storage, output: str, result: SourceResult) -> dict[str, Any]:
    """Write a source's shard, then its summary (the done marker); returns the summary."""
    summary = source_summary(result)
    if summary["shard"]:
        storage.write_bytes(storage.join(output, *summary["shard"].split("/")),
                            shard_bytes(result.clips))
    key = source_key(result.digest)
    storage.write_bytes(storage.join(output, SOURCE_DIR, f"{key}.json"),
                        json.dumps(summary, sort_keys=True).encode())
    return summary


def done_summary(storage: Storage, output: str, digest: str) -> dict[str, Any] | None:
    """The summary of a source already processed into ``output`` (None: not done yet)."""
    path = storage.join(output, SOURCE_DIR, f"{source_key(digest)}.json")
    if not storage.exists(path):
        return None
    summary = json.loads(storage.read_text(path))
    return summary if summary.get("sha256") == digest else None


def check_config(storage: Storage, output: str, cfg: IngestConfig) -> None:
    """Record the config on the first run; refuse to mix configs in one output directory."""
    path = storage.join(output, CONFIG_FILE)
    if storage.exists(path):
        old = json.loads(storage.read_text(path))
        if old != cfg.to_dict():
            diff = sorted(k for k in set(old) | set(cfg.to_dict()) if old.get(k) != cfg.to_dict().get(k))
            raise ValueError(f"{output} was ingested with a different config ({', '.join(diff)} "
                             f"differ); use a new output directory")
        return
    storage.write_bytes(path, json.dumps(cfg.to_dict(), sort_keys=True, indent=1).encode())


def build_manifest(summaries: Iterable[dict[str, Any]], cfg: IngestConfig,
                   duplicates: dict[str, list[str]], graph: dict[str, Any] | None,
                   skipped: int) -> dict[str, Any]:
    """The data set from source summaries (sorted by source path, so runners agree)."""
    summaries = sorted(summaries, key=lambda s: s["source"])
    shards, clips, failed = [], [], []
    rejected: dict[str, int] = {}
    count, total, total_sq = 0, np.zeros(REAL_MOTION_DIM), np.zeros(REAL_MOTION_DIM)
    for s in summaries:
        if s["status"] != "ok":
            failed.append({"source": s["source"], "error": s["error"]})
        for k, v in s["rejected"].items():
            rejected[k] = rejected.get(k, 0) + v
        if s["shard"]:
            shards.append({"path": s["shard"], "num_records": len(s["clips"])})
            clips.extend(s["clips"])
        ms = s["motion_sums"]
        count += ms["count"]
        total += np.asarray(ms["sum"])
        total_sq += np.asarray(ms["sumsq"])
    mean = total / max(count, 1)
    std = np.sqrt(np.maximum(total_sq / max(count, 1) - mean ** 2, 0.0))
    return {
        "format": FORMAT, "record_version": RECORD_VERSION,
        "record_encoding": "npz (numpy zip, no pickle)", "writer_options": WRITER_OPTIONS,
        "fps": FPS, "sample_rate": SAMPLE_RATE, "resolution": None,
        "longest_side": cfg.longest_side,
        "motion_fields": list(REAL_MOTION_FIELDS), "motion_dim": REAL_MOTION_DIM,
        "motion_mean": mean.tolist(), "motion_std": std.tolist(),
        "num_clips": len(clips), "num_sources": len(summaries), "shards": shards, "clips": clips,
        "report": {"ok": sum(s["status"] == "ok" for s in summaries), "failed": failed,
                   "rejected": dict(sorted(rejected.items())),
                   "duplicates": {k: v for k, v in sorted(duplicates.items())},
                   "skipped_as_done": skipped},
        "identity_graph": graph, "config": cfg.to_dict(),
    }


def graph_document(clips: list[dict[str, Any]], *, face_threshold: float,
                   background_threshold: float, min_frames: int
                   ) -> tuple[dict[str, Any] | None, bytes | None]:
    """(manifest entry, npz bytes) of the identity graph over the manifest's clips."""
    from avatarv_jax.data.identity_graph import IdentityGraph, build_identity_graph

    if not clips:
        return None, None
    graph: IdentityGraph = build_identity_graph(
        np.asarray([c["face_embedding"] for c in clips], np.float32),
        np.asarray([c["background"] for c in clips], np.float32),
        np.asarray([c["num_frames"] for c in clips], np.int64),
        face_threshold=face_threshold, background_threshold=background_threshold,
        min_frames=min_frames, index="exact" if len(clips) < 2048 else "auto")
    with tempfile.TemporaryDirectory(prefix="ingest-graph-") as tmp:
        path = os.path.join(tmp, GRAPH_FILE)
        graph.save(path)
        with open(path, "rb") as f:
            data = f.read()
    entry = {"path": GRAPH_FILE, "num_edges": len(graph.edges),
             "num_components": graph.num_components, "params": graph.params}
    return entry, data


def write_dataset(storage: Storage, output: str, manifest: dict[str, Any],
                  graph_bytes: bytes | None) -> None:
    """The identity graph, then the manifest (last: it marks the data set finished)."""
    if graph_bytes is not None:
        storage.write_bytes(storage.join(output, GRAPH_FILE), graph_bytes)
    storage.write_bytes(storage.join(output, MANIFEST),
                        json.dumps(manifest, indent=1, ensure_ascii=False).encode())


def _check_manifest(manifest: dict[str, Any], path: str) -> None:
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r} is not {FORMAT!r}")


class IngestedDataset(ShardedRecords):
    """Random access to an ingested data set: ``len(ds)``, ``ds[i] -> dict`` (manifest order)."""

    def __init__(self, directory: str):
        super().__init__(directory, "an ingested data set", _check_manifest)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return record_from_bytes(self.raw(index))

