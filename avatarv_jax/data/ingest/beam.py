"""The same ingestion and identity-graph build as an Apache Beam pipeline (``data-engine`` extra).

Graph of the pipeline::

    Create(paths) -> Reshuffle -> hash (sha256) -> GroupByKey(digest)   # one owner per content
      -> Process (skips "done" sources, writes shard + summary)         # the parallel part
      -> ToList -> Finish (identity graph + manifest, written last)     # one worker

It runs on the DirectRunner by default; any other runner (``--runner=DataflowRunner``,
``FlinkRunner``, ``SparkRunner``, with their usual options) takes the same pipeline unchanged:
file listing, reading and writing go through ``apache_beam.io.filesystems.FileSystems``, so
``gs://``, ``s3://`` or ``hdfs://`` inputs and outputs work where Beam has that file system.
Workers need the ``faces`` extra installed (e.g. ``--requirements_file`` or a custom container).
The per-source work is ``process.process_source``, the same function the plain runner calls,
so both runners write byte-identical shards.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from avatarv_jax.data.ingest import records
from avatarv_jax.data.ingest.config import VIDEO_EXTENSIONS, GraphOptions, IngestConfig
from avatarv_jax.data.ingest.process import clean_caption, file_digest, process_source

BEAM_EXTRA_HINT = ("the Beam runner needs the `data-engine` extra: "
                   "pip install 'avatarv-jax[data-engine]' (apache-beam)")


def beam_available() -> bool:
    try:
        import apache_beam  # noqa: F401
    except ImportError:
        return False
    return True


def _beam():
    try:
        import apache_beam as beam
    except ImportError as e:
        raise ImportError(BEAM_EXTRA_HINT) from e
    return beam


class BeamStorage:
    """``records.Storage`` over Beam's FileSystems (temporary name, then rename)."""

    def __init__(self):
        from apache_beam.io.filesystems import FileSystems
        self.fs = FileSystems

    def join(self, *parts: str) -> str:
        return self.fs.join(*parts)

    def exists(self, path: str) -> bool:
        return self.fs.exists(path)

    def read_text(self, path: str) -> str:
        with self.fs.open(path) as f:
            return f.read().decode("utf-8")

    def write_bytes(self, path: str, data: bytes) -> None:
        tmp = f"{path}.partial-{os.getpid()}"
        with self.fs.create(tmp) as f:
            f.write(data)
        if self.fs.exists(path):
            self.fs.delete([path])
        self.fs.rename([tmp], [path])


def list_sources_fs(input_dir: str) -> list[str]:
    """Sorted relative paths of the videos under ``input_dir`` on any Beam file system."""
    from apache_beam.io.filesystems import FileSystems

    base = input_dir.rstrip("/")
    if not FileSystems.exists(base) and "://" not in base:
        raise FileNotFoundError(f"input directory {input_dir} does not exist")
    pattern = FileSystems.join(base, "**")
    found = []
    for match in FileSystems.match([pattern])[0].metadata_list:
        rel = match.path[len(base):].lstrip("/\\").replace(os.sep, "/")
        if rel.lower().endswith(VIDEO_EXTENSIONS) and ".partial-" not in rel:
            found.append(rel)
    return sorted(found)


def _local_copy(path: str, tmpdir: str) -> str:
    """A local file path for PyAV: the path itself on a local disk, else a copy."""
    from apache_beam.io.filesystems import FileSystems

    if "://" not in path and os.path.exists(path):
        return path
    local = os.path.join(tmpdir, os.path.basename(path))
    with FileSystems.open(path) as src, open(local, "wb") as dst:
        shutil.copyfileobj(src, dst)
    return local


def _hash(rel: str, input_dir: str) -> tuple[str, str]:
    from apache_beam.io.filesystems import FileSystems

    with FileSystems.open(FileSystems.join(input_dir, rel)) as f:
        return file_digest(f), rel


def _caption(input_dir: str, rel: str, cfg: IngestConfig) -> str:
    """``process.caption_for`` through FileSystems (the sidecar may be remote)."""
    from apache_beam.io.filesystems import FileSystems

    side = FileSystems.join(input_dir, os.path.splitext(rel)[0] + ".txt")
    if not FileSystems.exists(side):
        return cfg.caption
    with FileSystems.open(side) as f:
        return clean_caption(f.read().decode("utf-8"), cfg)


def _process_group(element: tuple[str, Iterable[str]], input_dir: str, output: str,
                   cfg_dict: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """One content group (digest, paths): its first path is processed unless already done.
    dlib's models are loaded once per worker process (``faces.shared_models`` is cached)."""
    from apache_beam.io.filesystems import FileSystems

    from avatarv_jax.data.ingest.faces import shared_models

    digest, paths = element
    paths = sorted(paths)
    rel = paths[0]
    storage = BeamStorage()
    summary = records.done_summary(storage, output, digest)
    skipped = summary is not None
    if not skipped:
        cfg = IngestConfig(**cfg_dict)
        with tempfile.TemporaryDirectory(prefix="ingest-src-") as tmp:
            local = _local_copy(FileSystems.join(input_dir, rel), tmp)
            result = process_source(local, rel, digest, cfg, shared_models(),
                                    caption=_caption(input_dir, rel, cfg))
        summary = records.write_source(storage, output, result)
    yield {"summary": summary, "duplicates": paths[1:], "skipped": skipped}


def _finish(items: Sequence[dict[str, Any]], output: str, cfg_dict: dict[str, Any],
            graph_dict: dict[str, Any]) -> dict[str, Any]:
    from avatarv_jax.data.ingest.plain import finish

    summaries = [i["summary"] for i in items]
    dups = {i["summary"]["source"]: i["duplicates"] for i in items if i["duplicates"]}
    skipped = sum(i["skipped"] for i in items)
    manifest = finish(BeamStorage(), output, summaries, IngestConfig(**cfg_dict),
                      GraphOptions(**graph_dict), dups, skipped)
    return {"num_clips": manifest["num_clips"], "report": manifest["report"]}


def build_pipeline(pipeline, input_dir: str, output: str, cfg: IngestConfig,
                   graph: GraphOptions, sources: Iterable[str]):
    """Add the ingestion transforms to ``pipeline``; returns the PCollection of the report."""
    beam = _beam()
    cfg_dict, graph_dict = cfg.to_dict(), dict(vars(graph))
    return (pipeline
            | "ListSources" >> beam.Create(list(sources))
            | "Spread" >> beam.Reshuffle()
            | "Hash" >> beam.Map(_hash, input_dir)
            | "GroupByContent" >> beam.GroupByKey()
            | "Process" >> beam.FlatMap(_process_group, input_dir, output, cfg_dict)
            | "Collect" >> beam.combiners.ToList()
            | "Finish" >> beam.Map(_finish, output, cfg_dict, graph_dict))


def ingest_beam(input_dir: str, output: str, cfg: IngestConfig | None = None,
                graph: GraphOptions | None = None,
                pipeline_args: Sequence[str] = ()) -> dict[str, Any]:
    """Run the pipeline (DirectRunner unless ``pipeline_args`` name another runner) and return
    the manifest read back from ``output``."""
    beam = _beam()
    from apache_beam.options.pipeline_options import PipelineOptions

    cfg, graph = cfg or IngestConfig(), graph or GraphOptions()
    args = list(pipeline_args)
    if not any(a == "--runner" or a.startswith("--runner=") for a in args):
        args.append("--runner=DirectRunner")
    if "://" not in input_dir:
        input_dir = os.path.abspath(input_dir)
    if "://" not in output:
        output = os.path.abspath(output)
    storage = BeamStorage()
    sources = list_sources_fs(input_dir)
    records.check_config(storage, output, cfg)
    with beam.Pipeline(options=PipelineOptions(args)) as p:
        build_pipeline(p, input_dir, output, cfg, graph, sources)
    return json.loads(storage.read_text(storage.join(output, records.MANIFEST)))
