"""AvatarWorld speed: frames rendered per second per core, and data-set write throughput.

    python benchmarks/avatarworld.py            # prints, and saves JSON to benchmarks/results/
    python benchmarks/avatarworld.py --quick    # fewer frames, for a smoke run

Rendering is single-threaded numpy, so frames/s of one process is frames/s per core. The write
benchmark runs the real CLI path (speech, motion, render, serialise, ArrayRecord) into a
temporary directory and reports clips/s, frames/s and MB/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from avatarv_jax.data.avatarworld import identity as idn
from avatarv_jax.data.avatarworld import motion as mo
from avatarv_jax.data.avatarworld import render as rnd
from avatarv_jax.data.avatarworld import scene as scn
from avatarv_jax.data.avatarworld import speech
from avatarv_jax.data.avatarworld.cli import main as cli_main
from avatarv_jax.data.avatarworld.shards import AvatarWorldDataset
from avatarv_jax.tools.bench_io import host_info, write_json


def bench_render(resolution: int, frames: int, people: int = 4) -> dict:
    rng = np.random.default_rng(0)
    per = max(1, frames // people)
    # warm the background cache and numpy's code paths
    rnd.render(idn.sample_identity(0), scn.sample_scene(0), mo.random_motion(rng, 2), resolution)
    best = float("inf")
    for _ in range(2):  # best of two: the machine is shared
        t = time.perf_counter()
        for k in range(people):
            rnd.render(idn.sample_identity(k), scn.sample_scene(k), mo.random_motion(rng, per),
                       resolution)
        best = min(best, time.perf_counter() - t)
    return {"resolution": resolution, "frames": per * people, "seconds": round(best, 3),
            "frames_per_second_per_core": round(per * people / best, 1)}


def bench_write(resolution: int, clips: int, frames: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "ds")
        t = time.perf_counter()
        rc = cli_main(["write", out, "--clips", str(clips), "--resolution", str(resolution),
                       "--frames", str(frames)])
        dt = time.perf_counter() - t
        if rc != 0:
            raise RuntimeError("writing the data set failed")
        size = sum(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out))
        t = time.perf_counter()
        ds = AvatarWorldDataset(out)
        for c in ds:
            assert c.frames.shape == (frames, resolution, resolution, 3)
        read_s = time.perf_counter() - t
    return {"resolution": resolution, "clips": clips, "frames_per_clip": frames,
            "seconds": round(dt, 2), "clips_per_second": round(clips / dt, 2),
            "frames_per_second": round(clips * frames / dt, 1),
            "megabytes_on_disk": round(size / 1e6, 2),
            "megabytes_per_second": round(size / 1e6 / dt, 2),
            "read_clips_per_second": round(clips / read_s, 1)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                      "avatarworld_speed.json"))
    args = parser.parse_args(argv)
    n = 32 if args.quick else 128
    result = {"device": host_info(espeak_ng=speech.espeak_available()),
              "render": [bench_render(r, n if r <= 256 else n // 4) for r in (64, 128, 256, 512)],
              "write": [bench_write(128, 4 if args.quick else 16, 49),
                        bench_write(256, 2 if args.quick else 8, 49)]}
    print(json.dumps(result, indent=1))
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
