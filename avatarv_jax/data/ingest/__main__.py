"""Command line: ``python -m avatarv_jax.data.ingest --input DIR --output DIR [--runner ...]``.

``--runner plain`` (default) runs in this process without Beam; ``--runner direct`` runs the
Beam pipeline on the DirectRunner; any other value is passed to Beam as its runner
(``DataflowRunner``, ``FlinkRunner``, ``SparkRunner``, ...) together with every argument this
parser does not know (``--project``, ``--region``, ``--temp_location``, ...). Exit codes: 0 done,
2 bad input (missing input directory, bad option, config mismatch, missing extra), 1 when every
source failed to decode.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from avatarv_jax.data.ingest.config import GraphOptions, IngestConfig


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m avatarv_jax.data.ingest", allow_abbrev=False,
                                description="Ingest a directory of mp4/mov/webm videos into "
                                            "ArrayRecord training shards.")
    p.add_argument("--input", required=True, help="directory of videos (searched recursively)")
    p.add_argument("--output", required=True, help="output directory (reruns skip done files)")
    p.add_argument("--runner", default="plain",
                   help="plain (no Beam), direct (Beam DirectRunner) or a Beam runner name")
    d = IngestConfig()
    p.add_argument("--longest_side", type=int, default=d.longest_side)
    p.add_argument("--min_seconds", type=float, default=d.min_seconds)
    p.add_argument("--max_clip_seconds", type=float, default=d.max_clip_seconds)
    p.add_argument("--detect_every", type=int, default=d.detect_every)
    p.add_argument("--detector_upsample", type=int, default=d.detector_upsample)
    p.add_argument("--caption", default=d.caption,
                   help="caption for videos without a <video>.txt beside them")
    p.add_argument("--allow_silent", action="store_true", help="keep sources without audio")
    g = GraphOptions()
    p.add_argument("--face_threshold", type=float, default=g.face_threshold)
    p.add_argument("--background_threshold", type=float, default=g.background_threshold)
    p.add_argument("--graph_min_frames", type=int, default=g.min_frames)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if rest and args.runner == "plain":
        parser.error(f"unrecognised arguments for the plain runner: {' '.join(rest)}")
    try:
        cfg = IngestConfig(longest_side=args.longest_side, min_seconds=args.min_seconds,
                           max_clip_seconds=args.max_clip_seconds, detect_every=args.detect_every,
                           detector_upsample=args.detector_upsample, caption=args.caption,
                           require_audio=not args.allow_silent)
        graph = GraphOptions(face_threshold=args.face_threshold,
                             background_threshold=args.background_threshold,
                             min_frames=args.graph_min_frames)
        if "://" not in args.input and not os.path.isdir(args.input):
            raise FileNotFoundError(f"input directory {args.input} does not exist")
        from avatarv_jax.data.ingest.faces import FACES_EXTRA_HINT, faces_available
        if not faces_available():
            raise ImportError(FACES_EXTRA_HINT)
        if args.runner == "plain":
            from avatarv_jax.data.ingest.plain import ingest_plain
            manifest = ingest_plain(args.input, args.output, cfg, graph)
        else:
            from avatarv_jax.data.ingest.beam import ingest_beam
            runner = "DirectRunner" if args.runner == "direct" else args.runner
            manifest = ingest_beam(args.input, args.output, cfg, graph,
                                   [f"--runner={runner}", *rest])
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    report = manifest["report"]
    print(json.dumps({"num_clips": manifest["num_clips"], **report}, indent=1))
    if manifest["num_sources"] and report["ok"] == 0 and not report["skipped_as_done"]:
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
