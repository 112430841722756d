"""The single-process runner: ingest a directory of videos without Apache Beam.

Sources are identified by content (sha256), so renamed or copied files are not ingested twice
and a rerun skips every source whose summary is already in the output ("done"), including the
corrupt ones (their failure is remembered, not retried, until the file changes).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

from avatarv_jax.data.ingest import records
from avatarv_jax.data.ingest.config import VIDEO_EXTENSIONS, GraphOptions, IngestConfig
from avatarv_jax.data.ingest.process import file_digest, process_source


def list_sources(input_dir: str) -> list[str]:
    """Video files under ``input_dir`` (recursive), as sorted "/"-separated relative paths."""
    if not os.path.isdir(input_dir):
        raise FileNotFoundError(f"input directory {input_dir} does not exist")
    found = []
    for root, dirs, files in os.walk(input_dir):
        dirs.sort()
        for name in files:
            if name.lower().endswith(VIDEO_EXTENSIONS) and ".partial-" not in name:
                rel = os.path.relpath(os.path.join(root, name), input_dir)
                found.append(rel.replace(os.sep, "/"))
    return sorted(found)


def group_by_content(digests: dict[str, str]) -> tuple[dict[str, str], dict[str, list[str]]]:
    """({digest: owner path}, {owner: [duplicate paths]}): the first path (sorted) owns it."""
    owners: dict[str, str] = {}
    dups: dict[str, list[str]] = {}
    for path in sorted(digests):
        d = digests[path]
        if d in owners:
            dups.setdefault(owners[d], []).append(path)
        else:
            owners[d] = path
    return owners, dups


def ingest_plain(input_dir: str, output: str, cfg: IngestConfig | None = None,
                 graph: GraphOptions | None = None,
                 log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Ingest every video under ``input_dir`` into ``output``; returns the manifest."""
    from avatarv_jax.data.ingest.faces import shared_models

    cfg, graph = cfg or IngestConfig(), graph or GraphOptions()
    log = log or (lambda msg: print(msg, file=sys.stderr))
    storage = records.LocalStorage()
    sources = list_sources(input_dir)
    os.makedirs(output, exist_ok=True)
    records.check_config(storage, output, cfg)
    digests = {}
    for rel in sources:
        with open(os.path.join(input_dir, rel), "rb") as f:
            digests[rel] = file_digest(f)
    owners, dups = group_by_content(digests)
    summaries, skipped = [], 0
    models = None
    for i, (digest, rel) in enumerate(sorted(owners.items(), key=lambda kv: kv[1])):
        summary = records.done_summary(storage, output, digest)
        if summary is not None:
            skipped += 1
            log(f"[{i + 1}/{len(owners)}] {rel}: done before, skipped")
        else:
            models = models or shared_models()
            result = process_source(os.path.join(input_dir, rel), rel, digest, cfg, models)
            summary = records.write_source(storage, output, result)
            if result.status == "ok":
                log(f"[{i + 1}/{len(owners)}] {rel}: {len(result.clips)} clips, "
                    f"rejected {result.rejected}")
            else:
                log(f"[{i + 1}/{len(owners)}] {result.error} (skipped)")
        summaries.append(summary)
    return finish(storage, output, summaries, cfg, graph, dups, skipped)


def finish(storage: records.Storage, output: str, summaries: list[dict[str, Any]],
           cfg: IngestConfig, graph: GraphOptions, dups: dict[str, list[str]],
           skipped: int) -> dict[str, Any]:
    """Build the identity graph over all clips and write the manifest (shared with Beam)."""
    manifest = records.build_manifest(summaries, cfg, dups, None, skipped)
    entry, data = records.graph_document(manifest["clips"], face_threshold=graph.face_threshold,
                                         background_threshold=graph.background_threshold,
                                         min_frames=graph.min_frames)
    manifest["identity_graph"] = entry
    records.write_dataset(storage, output, manifest, data)
    return manifest
