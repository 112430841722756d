"""Command line for AvatarWorld: write data sets, preview clips, draw contact sheets.

    python -m avatarv_jax.data.avatarworld write OUT_DIR --clips 64 --resolution 128
    python -m avatarv_jax.data.avatarworld preview clip.mp4 --identity 3 --scene 5 --language de
    python -m avatarv_jax.data.avatarworld sheet sheet.png --rows 4 --cols 6
    python -m avatarv_jax.data.avatarworld inspect OUT_DIR

``write`` builds the data set in a temporary directory beside OUT_DIR and renames it at the end,
so OUT_DIR is either absent, the old data set, or the complete new one.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import numpy as np

from avatarv_jax.data.avatarworld import identity as idn
from avatarv_jax.data.avatarworld import media
from avatarv_jax.data.avatarworld import speech
from avatarv_jax.data.avatarworld.clip import Clip, make_clip
from avatarv_jax.data.avatarworld.motion import random_motion
from avatarv_jax.data.avatarworld.render import render
from avatarv_jax.data.avatarworld.scene import sample_scene
from avatarv_jax.data.avatarworld.shards import AvatarWorldDataset, ShardWriter


class CliError(Exception):
    """A problem with the user's request, reported without a traceback."""


def _resolution(text: str) -> int:
    value = int(text)
    if not 64 <= value <= 512 or value % 2:
        raise argparse.ArgumentTypeError(f"resolution must be an even number in [64, 512], got {value}")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _languages(text: str) -> list[str]:
    langs = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in langs if t not in speech.LANGUAGES]
    if not langs or bad:
        raise argparse.ArgumentTypeError(
            f"unknown language(s) {bad or text!r}; choose from {','.join(speech.LANGUAGE_CODES)}")
    return langs


def clip_plan(num_clips: int, split: str, num_identities: int, num_scenes: int, seed: int,
              languages: list[str]) -> list[dict]:
    """Which person, scene, language and seed each clip of a data set gets (deterministic).

    People recur across clips (``num_identities`` of them), so a clip's person can be shown
    through a *different* clip as the reference, as personality fine-tuning needs.
    """
    people = idn.ids_in_split(split, num_identities)
    places = idn.ids_in_split(split, num_scenes)
    plan = []
    for k in range(num_clips):
        rng = idn.rng_for("dataset", seed, k)
        plan.append({"seed": seed * 1_000_003 + k, "identity_id": people[k % len(people)],
                     "scene_id": int(places[rng.integers(len(places))]),
                     "language": languages[int(rng.integers(len(languages)))]})
    return plan


def sheet_from_clips(clips: list[Clip], cols: int = 6) -> np.ndarray:
    rows = []
    for c in clips:
        idx = np.linspace(0, c.num_frames - 1, cols).round().astype(int)
        rows.append([c.frames[i] for i in idx])
    return media.contact_sheet(rows)


def cmd_write(args) -> None:
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.overwrite:
        raise CliError(f"{out} exists; pass --overwrite to replace it")
    parent = os.path.dirname(out)
    if not os.path.isdir(parent):
        raise CliError(f"parent directory {parent} does not exist")
    speech.resolve_backend(args.speech)
    tmp = f"{out}.partial-{os.getpid()}"
    num_frames = args.frames or max(1, int(round(args.seconds * speech.FPS)))
    plan = clip_plan(args.clips, args.split, args.identities or max(1, args.clips // 4),
                     args.scenes, args.seed, args.languages)
    writer = ShardWriter(tmp, clips_per_shard=args.clips_per_shard)
    preview = []
    t0 = time.perf_counter()
    try:
        for k, p in enumerate(plan):
            clip = make_clip(p["seed"], p["identity_id"], p["scene_id"], p["language"],
                             resolution=args.resolution, num_frames=num_frames,
                             speech_backend=args.speech)
            writer.add(clip)
            if k < args.mp4:
                os.makedirs(os.path.join(tmp, "preview"), exist_ok=True)
                media.write_mp4(os.path.join(tmp, "preview", f"clip_{k:05d}.mp4"),
                                clip.frames, clip.audio)
            if args.contact_sheet and len(preview) < 8:
                preview.append(clip)
            if (k + 1) % max(1, args.clips // 10) == 0 or k + 1 == len(plan):
                dt = time.perf_counter() - t0
                print(f"{k + 1}/{len(plan)} clips, {writer.bytes_written / 2**20:.1f} MiB, "
                      f"{(k + 1) / dt:.2f} clips/s", flush=True)
        elapsed = time.perf_counter() - t0
        manifest = writer.close({"split": args.split, "seed": args.seed, "frames_per_clip": num_frames,
                                 "speech_backend": speech.resolve_backend(args.speech),
                                 "write_seconds": round(elapsed, 2)})
        if preview:
            media.write_png(os.path.join(tmp, "contact_sheet.png"), sheet_from_clips(preview))
        if os.path.exists(out):
            old = f"{out}.old-{os.getpid()}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"wrote {manifest['num_clips']} clips in {len(manifest['shards'])} shard(s) to {out} "
          f"({elapsed:.1f} s, {num_frames * manifest['num_clips'] / elapsed:.1f} frames/s)")


def cmd_preview(args) -> None:
    if not args.out.endswith(".mp4"):
        raise CliError(f"output must end in .mp4, got {args.out}")
    clip = make_clip(args.seed, args.identity, args.scene, args.language, args.seconds,
                     args.resolution, speech_backend=args.speech)
    media.write_mp4(args.out, clip.frames, clip.audio)
    print(f"wrote {args.out}: {clip.num_frames} frames, identity {clip.identity_id} "
          f"({clip.split}), caption: {clip.caption}")


def cmd_sheet(args) -> None:
    """Rows of people (each in its own scene) under poses that show every feature."""
    if not args.out.endswith(".png"):
        raise CliError(f"output must end in .png, got {args.out}")
    rng = np.random.default_rng(args.seed)
    rows = []
    for r in range(args.rows):
        person = idn.sample_identity(args.first_identity + r)
        motion = random_motion(rng, args.cols)
        motion[0] = 0.0  # neutral pose first
        rows.append(list(render(person, sample_scene(args.first_identity + r), motion,
                                args.resolution).frames))
    media.write_png(args.out, media.contact_sheet(rows))
    print(f"wrote {args.out}")


def cmd_inspect(args) -> None:
    ds = AvatarWorldDataset(args.directory)
    m = ds.manifest
    first = ds[0]
    print(json.dumps({"clips": len(ds), "shards": len(m["shards"]), "resolution": m["resolution"],
                      "frames_per_clip": m.get("frames_per_clip"), "split": m.get("split"),
                      "first_clip": {"identity_id": first.identity_id, "scene_id": first.scene_id,
                                     "language": first.language, "caption": first.caption,
                                     "frames": list(first.frames.shape)}}, indent=1))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m avatarv_jax.data.avatarworld",
                                     description="AvatarWorld: a procedural talking-avatar world.")
    sub = parser.add_subparsers(dest="command", required=True)

    w = sub.add_parser("write", help="write a data set as ArrayRecord shards + manifest")
    w.add_argument("out", help="output directory (must not exist unless --overwrite)")
    w.add_argument("--clips", type=_positive, default=64)
    w.add_argument("--split", choices=("train", "heldout"), default="train")
    w.add_argument("--identities", type=_positive, default=None,
                   help="distinct people (default: clips / 4, so people recur)")
    w.add_argument("--scenes", type=_positive, default=64)
    w.add_argument("--resolution", type=_resolution, default=128)
    w.add_argument("--seconds", type=float, default=1.96, help="clip length (default 49 frames)")
    w.add_argument("--frames", type=_positive, default=None, help="frames per clip (overrides --seconds)")
    w.add_argument("--languages", type=_languages, default=list(speech.LANGUAGE_CODES))
    w.add_argument("--clips-per-shard", type=_positive, default=64)
    w.add_argument("--seed", type=int, default=0)
    w.add_argument("--mp4", type=int, default=0, help="also write the first N clips as mp4")
    w.add_argument("--contact-sheet", action="store_true", help="also write contact_sheet.png")
    w.add_argument("--speech", choices=("auto", "espeak-ng", "synthetic"), default="auto")
    w.add_argument("--overwrite", action="store_true")
    w.set_defaults(func=cmd_write)

    p = sub.add_parser("preview", help="render one clip to an mp4 with sound")
    p.add_argument("out")
    p.add_argument("--identity", type=int, default=0)
    p.add_argument("--scene", type=int, default=0)
    p.add_argument("--language", choices=speech.LANGUAGE_CODES, default="en")
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--resolution", type=_resolution, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--speech", choices=("auto", "espeak-ng", "synthetic"), default="auto")
    p.set_defaults(func=cmd_preview)

    s = sub.add_parser("sheet", help="contact sheet PNG of several people")
    s.add_argument("out")
    s.add_argument("--rows", type=_positive, default=4)
    s.add_argument("--cols", type=_positive, default=6)
    s.add_argument("--first-identity", type=int, default=0)
    s.add_argument("--resolution", type=_resolution, default=128)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_sheet)

    i = sub.add_parser("inspect", help="summarise a written data set")
    i.add_argument("directory")
    i.set_defaults(func=cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "seconds", 1.0) is not None and getattr(args, "seconds", 1.0) <= 0:
            raise CliError(f"--seconds must be positive, got {args.seconds}")
        if getattr(args, "seed", 0) < 0:
            raise CliError(f"--seed must be non-negative, got {args.seed}")
        args.func(args)
    except (CliError, ValueError, FileNotFoundError, FileExistsError,
            speech.SpeechBackendError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
