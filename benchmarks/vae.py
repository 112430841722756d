"""Video VAE speed and memory: frames/s for encode/decode, and peak memory of streaming decode.

    python benchmarks/vae.py                      # tiny config, CPU-sized inputs
    python benchmarks/vae.py --size 64 --long 1601

Each measurement runs in its own subprocess, because peak RSS (``ru_maxrss``) only grows
within a process. The memory figures show that streaming decode (one latent frame at a time,
frames handed to the caller and dropped) stays flat from 81 to 809 frames, while decoding the
whole video at once grows with length. Prints a table and writes
``benchmarks/results/vae_<platform>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def _setup():
    """Tiny VAE with numpy-drawn weights (speed does not depend on the values, and a
    jax.random initialiser per parameter shape compiles slowly on a small CPU)."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from avatarv_jax.models.vae import CausalVideoVAE, VAEConfig, VAEStreamer

    cfg = VAEConfig.tiny()
    vae = nnx.eval_shape(lambda: CausalVideoVAE(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    filled = [(path, var.replace(value=jnp.asarray(
        rng.standard_normal(var.shape) / np.sqrt(np.prod(var.shape[:-1]) or 1), jnp.float32)))
        for path, var in nnx.to_flat_state(nnx.state(vae, nnx.Param))]
    nnx.update(vae, nnx.from_flat_state(filled))
    return jax, cfg, VAEStreamer(vae)


def measure(kind: str, frames: int, size: int, repeats: int) -> dict:
    """One measurement in this process; returns a JSON-able dict."""
    jax, cfg, streamer = _setup()
    import numpy as np

    n_lat = cfg.latent_frames(frames)
    s = size // cfg.spatial_stride
    key = jax.random.key(0)
    if kind in ("encode", "encode_stream"):
        data = jax.random.uniform(key, (1, frames, size, size, 3), minval=-1.0, maxval=1.0)
    else:
        data = jax.random.normal(key, (1, n_lat, s, s, cfg.z_dim))

    def run():
        if kind == "encode":
            return [streamer.encode(data)]
        if kind == "decode":
            return [streamer.decode(data)]
        if kind == "encode_stream":
            return list(streamer.encode_stream(data, chunk_frames=4))
        # decode_stream: hand each chunk to the host and drop it, as a video writer would
        count = 0
        for chunk in streamer.decode_stream(data, chunk_latents=1):
            count += np.asarray(chunk).shape[1]
        assert count == frames
        return []

    # Warm up on a short clip so compiles are not timed (streams reuse the chunk shapes).
    if kind.endswith("stream"):
        warm = data[:, :5] if kind == "encode_stream" else data[:, :2]
        if kind == "encode_stream":
            jax.block_until_ready(list(streamer.encode_stream(warm, chunk_frames=4)))
        else:
            for chunk in streamer.decode_stream(warm):
                np.asarray(chunk)
    rss_before = _peak_rss_mib()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        times.append(time.perf_counter() - t0)
    # For whole-video runs the first repeat includes the compile: report the best.
    best = min(times)
    return dict(kind=kind, frames=frames, size=size, seconds=best, fps=frames / best,
                peak_rss_mib=_peak_rss_mib(), peak_rss_before_run_mib=rss_before)


def _subprocess(kind: str, frames: int, size: int, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--measure", kind, "--frames", str(frames),
           "--size", str(size), "--repeats", str(repeats)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=32, help="video height and width (pixels)")
    p.add_argument("--short", type=int, default=81, help="frames of the short video")
    p.add_argument("--long", type=int, default=809, help="frames of the long video (1 + 4k)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--skip-whole-long", action="store_true",
                   help="skip decoding the long video in one piece (the memory contrast)")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    p.add_argument("--frames", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.measure:
        print(json.dumps(measure(args.measure, args.frames, args.size, args.repeats)))
        return

    import jax

    device = jax.devices()[0]
    runs = [("encode", args.short), ("decode", args.short), ("encode_stream", args.short),
            ("decode_stream", args.short), ("decode_stream", args.long)]
    if not args.skip_whole_long:
        runs.append(("decode", args.long))
    results = []
    for kind, frames in runs:
        # A long stream reuses the warm-up's compiled chunk shapes: one timed pass is enough.
        repeats = 1 if kind.endswith("stream") and frames == args.long else args.repeats
        r = _subprocess(kind, frames, args.size, repeats)
        results.append(r)
        print(f"{kind:14s} {frames:5d} frames {args.size}x{args.size}: {r['fps']:8.1f} frames/s"
              f"  peak RSS {r['peak_rss_mib']:7.1f} MiB (before the timed runs "
              f"{r['peak_rss_before_run_mib']:7.1f})", flush=True)
    report = dict(
        benchmark="vae", config="VAEConfig.tiny()", device=f"{device.platform}: "
        f"{getattr(device, 'device_kind', '')}", cpu=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(), jax=jax.__version__, results=results)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"vae_{device.platform}.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
