"""Evaluation throughput: clips scored per minute (every metric, SyncNet + probe + drift).

    python benchmarks/eval.py                 # 4 held-out cases of 10 s at 128 px, 3 baselines
    python benchmarks/eval.py --quick         # 2 cases of 4 s at 64 px

Rendering the cases (the ground truth) is timed apart from scoring: a user's evaluation renders
once and scores every system against it. JSON goes to benchmarks/results/eval_<device>.json.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from avatarv_jax.data.avatarworld.probe import load_probe
from avatarv_jax.eval import avatarworld_eval as awe
from avatarv_jax.eval import baselines as bl
from avatarv_jax.eval import syncnet as sn
from avatarv_jax.tools.bench_io import device_tag, host_info, write_json


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=4)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.cases, args.seconds, args.resolution = 2, 4.0, 64
    probe = load_probe()
    ev = awe.AvatarWorldEvaluator(probe, sn.SyncScorer(sn.load_syncnet()))
    cases = awe.heldout_cases(args.cases, args.seconds, args.resolution)
    t0 = time.perf_counter()
    truths = [awe.render_case(c, probe) for c in cases]
    render_s = time.perf_counter() - t0
    inputs = bl.baseline_inputs([t.clip.frames for t in truths], [t.clip.audio for t in truths],
                                [t.reference_frame for t in truths])
    ev.score(truths[0], *inputs["ground_truth"][0])  # compile
    t1 = time.perf_counter()
    clips = 0
    for items in inputs.values():
        for t, (frames, audio) in zip(truths, items):
            ev.score(t, frames, audio)
            clips += 1
    score_s = time.perf_counter() - t1
    result = host_info(
        cases=args.cases, seconds=args.seconds, resolution=args.resolution,
        clips_scored=clips, score_seconds=score_s, clips_per_minute=60 * clips / score_s,
        video_seconds_per_second=clips * args.seconds / score_s,
        render_seconds_per_case=render_s / args.cases)
    print(f"{clips} clips of {args.seconds:g} s at {args.resolution} px scored in {score_s:.1f}s:"
          f" {result['clips_per_minute']:.1f} clips/min "
          f"({result['video_seconds_per_second']:.1f} s of video per s); rendering "
          f"{result['render_seconds_per_case']:.1f} s per case")
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"eval_{device_tag()}.json")
    write_json(result, out)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
