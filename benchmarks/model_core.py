"""Tiny-config DiT forward and forward+backward time, plus parameter counts of every config.

    python benchmarks/model_core.py            # prints and writes benchmarks/results/model_core_<device>.json

Times are the median of ``--repeats`` runs of the jitted function after one warm-up call
(compile time reported separately). The shapes are those of a small chunk: 2 reference
frames and 5 GEN latent frames of 8x8 latents (64x64 pixels), batch 1, motion and audio on.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from avatarv_jax.config import get_model_config
from avatarv_jax.models.dit import DiT
from avatarv_jax.testing import random_inputs, tiny_dit_config
from avatarv_jax.tools.param_count import count_all
from avatarv_jax.tools.bench_io import device_name, write_json


def time_fn(fn, *args, repeats: int):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    compile_s = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - start)
    return compile_s, statistics.median(runs)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    cfg = tiny_dit_config()
    graphdef, state = nnx.split(DiT(cfg, rngs=nnx.Rngs(0)))
    gen, ref = random_inputs(cfg, batch=1, gen_frames=5, ref_frames=2, size=(8, 8))

    def loss(state, gen, ref):
        out = nnx.merge(graphdef, state)(gen, ref)
        return jnp.mean(out["video"] ** 2) + jnp.mean(out["motion"] ** 2)

    forward = jax.jit(lambda s, g, r: nnx.merge(graphdef, s)(g, r))
    backward = jax.jit(jax.value_and_grad(loss))
    fwd_compile, fwd = time_fn(forward, state, gen, ref, repeats=args.repeats)
    bwd_compile, bwd = time_fn(backward, state, gen, ref, repeats=args.repeats)

    counts = {}
    for name in ("tiny", "avatar_v_1_3b", "avatar_v_14b"):
        for variant in ("", "sr"):
            cfg_v = get_model_config(name, variant)
            counts[cfg_v.name] = count_all(cfg_v)
    result = {
        "device": device_name(), "jax": jax.__version__,
        "tiny_shapes": {"batch": 1, "ref_frames": 2, "gen_frames": 5, "latent": [8, 8, 16]},
        "tiny_forward_s": fwd, "tiny_forward_backward_s": bwd,
        "tiny_forward_compile_s": fwd_compile, "tiny_forward_backward_compile_s": bwd_compile,
        "parameter_counts": counts,
    }
    print(f"device {result['device']}, jax {jax.__version__}")
    print(f"tiny forward          {1e3 * fwd:8.1f} ms (compile {fwd_compile:.1f} s)")
    print(f"tiny forward+backward {1e3 * bwd:8.1f} ms (compile {bwd_compile:.1f} s)")
    for name, c in result["parameter_counts"].items():
        print(f"{name:<18} DiT {c['dit_total']:>15,}  "
              f"Wan-compatible {c['dit']['wan_compatible']:>15,}")
    path = write_json(result, os.path.join(args.out, f"model_core_{jax.devices()[0].platform}.json"),
                      indent=2)
    print("wrote", path)


if __name__ == "__main__":
    main()
