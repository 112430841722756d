"""Sparse Reference Attention: time against reference length, Pallas kernel vs baselines.

    python benchmarks/sra_kernel.py                 # GPU: the issue's shapes (GEN = 32,760)
    python benchmarks/sra_kernel.py --quick         # tiny shapes (what runs on a CPU)
    python benchmarks/sra_kernel.py --tune          # GPU: pick the kernel's tiles first

``--tune`` times the kernel at the first reference length over a grid of tile sizes, warps and
pipeline stages (forward tiles by forward time, then backward tiles by forward+backward time)
and uses the fastest for every row; the grid's times are saved with the results.

For a fixed GEN length and reference lengths of 1x..16x of it, times the forward and the
forward+backward of:

- ``pallas``: the block-sparse kernel (``kernels/sra_pallas.py``; interpret mode on CPU, so
  CPU times say nothing about GPU speed);
- ``xla``: the dense-mask reference (skipped where its [B, H, S, S] logits would not fit);
- ``cudnn`` (GPU only): ``attention_impl="cudnn"`` (``kernels/sra_cudnn.py``), the strongest
  composition of library kernels: GEN rows by one cuDNN attention call over the concatenated
  GEN+REF keys (the public API returns no log-sum-exp, so the two key segments are joined
  rather than merged by LSE) and REF rows by a second call batched per latent frame.

TFLOP/s count only allowed query-key pairs (``SRALayout.allowed_pairs``): 4 flops per pair and
head dim forward, 2.5x that backward. Saves JSON to ``benchmarks/results/sra_kernel_<dev>.json``
and, when matplotlib is installed, a PNG of time and TFLOP/s against reference length.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from avatarv_jax.kernels.sra_layout import SRALayout
from avatarv_jax.kernels.sra_cudnn import sra_cudnn
from avatarv_jax.kernels.sra_pallas import BlockSizes, sra_pallas
from avatarv_jax.kernels.sra_reference import sra_reference
from avatarv_jax.tools.bench_io import device_name, device_tag, write_json

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def cudnn_composition(layout: SRALayout):
    """REF rows per frame + GEN rows over [GEN | REF]: ``attention_impl="cudnn"``."""
    if layout.ref_window != 0 or layout.gen_window != -1:
        raise ValueError("the cuDNN composition covers ref_window=0, gen_window=-1 only")
    return lambda *a: sra_cudnn(*a, layout=layout, implementation="cudnn")


def implementations(layout: SRALayout, blocks: BlockSizes | None, on_gpu: bool) -> dict:
    impls = {
        "pallas": lambda *a: sra_pallas(*a, layout=layout, block_sizes=blocks),
        "xla": lambda *a: sra_reference(*a, layout=layout),
    }
    if on_gpu and layout.ref_window == 0 and layout.gen_window == -1:
        impls["cudnn"] = cudnn_composition(layout)
    elif on_gpu:
        print("cudnn composition skipped: it covers ref_window=0, gen_window=-1 only")
    return impls


def dense_fits(layout: SRALayout, batch: int, heads: int) -> bool:
    """The dense reference holds a few [B, H, S, S] fp32 arrays; keep it under ~40% of memory."""
    s = layout.ref_len + layout.gen_len
    need = 3 * batch * heads * s * s * 4
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit", 16 << 30)
    return need < 0.4 * limit


FORWARD_TILES = [(bq, bk, warps, stages) for bq in (64, 128) for bk in (64, 128)
                 for warps in (4, 8) for stages in (2, 3)]
BACKWARD_TILES = [(bq, bk, warps, stages) for bq, bk in ((32, 64), (64, 64), (64, 128))
                  for warps in (4, 8) for stages in (2, 3)]


def parse_blocks(text: str) -> BlockSizes:
    """'q,k,q_bwd,k_bwd[,warps,stages[,warps_bwd,stages_bwd]]' -> BlockSizes."""
    values = [int(v) for v in text.split(",")]
    if len(values) not in (4, 6, 8):
        raise ValueError("--blocks takes 4, 6 or 8 integers: "
                         "q,k,q_bwd,k_bwd[,warps,stages[,warps_bwd,stages_bwd]]")
    return BlockSizes(*values)


def tune(layout: SRALayout, inputs, repeats: int) -> tuple[BlockSizes, list]:
    """Fastest forward tiles (by forward time), then fastest backward tiles with them."""
    trials = []

    def attempt(blocks, phase):
        impl = implementations(layout, blocks, on_gpu=False)["pallas"]
        try:
            t_fwd, t_both = (bench_one("pallas", impl, inputs, repeats) if phase == "backward"
                             else (time_call(jax.jit(impl), inputs, repeats)[1], None))
        except Exception as e:  # noqa: BLE001 - a tile set that does not compile is skipped
            print(f"  tune {blocks}: {type(e).__name__}: {str(e)[:120]}")
            trials.append({"blocks": vars_of(blocks), "phase": phase, "error": str(e)[:200]})
            return None
        t = t_both if phase == "backward" else t_fwd
        trials.append({"blocks": vars_of(blocks), "phase": phase, "seconds": t})
        print(f"  tune {phase:8s} {vars_of(blocks)}: {t * 1e3:.2f} ms")
        return t

    best, best_t = None, float("inf")
    for bq, bk, warps, stages in FORWARD_TILES:
        blocks = BlockSizes(bq, bk, num_warps=warps, num_stages=stages)
        t = attempt(blocks, "forward")
        if t is not None and t < best_t:
            best, best_t = blocks, t
    if best is None:
        raise RuntimeError("no forward tile set compiled")
    fwd_best, best_t = best, float("inf")
    for bq, bk, warps, stages in BACKWARD_TILES:
        blocks = dataclasses.replace(fwd_best, block_q_bwd=bq, block_k_bwd=bk,
                                     num_warps_bwd=warps, num_stages_bwd=stages)
        t = attempt(blocks, "backward")
        if t is not None and t < best_t:
            best, best_t = blocks, t
    return best, trials


def vars_of(blocks: BlockSizes) -> dict:
    return dataclasses.asdict(blocks)


def time_call(fn, args, repeats: int) -> tuple[float, float]:
    """(compile+first-run seconds, median seconds of ``repeats`` runs)."""
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    first = time.perf_counter() - start
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        runs.append(time.perf_counter() - start)
    return first, statistics.median(runs)


def bench_one(name, impl, args, repeats):
    fwd = jax.jit(impl)

    def loss(*a):
        o_ref, o_gen = impl(*a)
        return jnp.sum(o_ref.astype(jnp.float32)) + jnp.sum(o_gen.astype(jnp.float32))

    fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=tuple(range(6))))
    _, t_fwd = time_call(fwd, args, repeats)
    _, t_both = time_call(fwd_bwd, args, repeats)
    return t_fwd, t_both


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke run)")
    parser.add_argument("--gen_frames", type=int, default=21)
    parser.add_argument("--tokens_per_frame", type=int, default=1560)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--head_dim", type=int, default=128)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--multiples", default="1,2,4,8,16",
                        help="reference lengths as multiples of the GEN length")
    parser.add_argument("--ref_window", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--impls", default="pallas,xla,cudnn")
    parser.add_argument("--blocks", default=None,
                        help="kernel tiles q,k,q_bwd,k_bwd[,warps,stages[,warps_bwd,"
                             "stages_bwd]] (default: the kernel's own; on CPU 32,32,32,32)")
    parser.add_argument("--tune", action="store_true",
                        help="pick the tiles by timing a grid at the first reference length")
    parser.add_argument("--out", default=None,
                        help="JSON path (default: results/sra_kernel_<device>.json)")
    args = parser.parse_args(argv)
    if args.quick:
        args.gen_frames, args.tokens_per_frame, args.heads, args.head_dim = 3, 24, 2, 64
        args.multiples, args.repeats = "1,2,4", 2
    try:
        multiples = [int(m) for m in args.multiples.split(",")]
    except ValueError:
        print(f"--multiples must be integers separated by commas, got {args.multiples!r}",
              file=sys.stderr)
        return 2
    if min(multiples) < 1 or min(args.gen_frames, args.tokens_per_frame, args.heads,
                                 args.head_dim, args.batch, args.repeats) < 1:
        print("sizes, multiples and repeats must be >= 1", file=sys.stderr)
        return 2
    wanted = args.impls.split(",")
    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    dtype = jnp.dtype(args.dtype)
    try:
        blocks = parse_blocks(args.blocks) if args.blocks else (
            None if on_gpu else BlockSizes(32, 32, 32, 32))
    except ValueError as e:
        print(f"--blocks: {e}", file=sys.stderr)
        return 2

    rows, trials = [], []
    for m in multiples:
        layout = SRALayout(m * args.gen_frames, args.gen_frames, args.tokens_per_frame,
                           ref_window=args.ref_window)
        keys = jax.random.split(jax.random.key(m), 6)
        lens = [layout.ref_len] * 3 + [layout.gen_len] * 3
        inputs = [jax.random.normal(k, (args.batch, n, args.heads, args.head_dim), dtype)
                  for k, n in zip(keys, lens)]
        if args.tune and not trials:
            blocks, trials = tune(layout, inputs, args.repeats)
            print(f"tuned tiles: {vars_of(blocks)}")
        pairs = layout.allowed_pairs() * args.batch * args.heads
        flops_fwd = 4 * pairs * args.head_dim
        row = {"ref_multiple": m, "ref_len": layout.ref_len, "gen_len": layout.gen_len,
               "allowed_pairs": pairs, "times_s": {}, "tflops": {}}
        for name, impl in implementations(layout, blocks, on_gpu).items():
            if name not in wanted:
                continue
            if name == "xla" and not dense_fits(layout, args.batch, args.heads):
                row["times_s"][name] = None
                continue
            try:
                t_fwd, t_both = bench_one(name, impl, inputs, args.repeats)
            except Exception as e:  # noqa: BLE001 - report and keep timing the others
                print(f"  {name} failed at {m}x: {type(e).__name__}: {str(e)[:200]}")
                row["times_s"][name] = None
                continue
            row["times_s"][name] = {"forward": t_fwd, "forward_backward": t_both}
            row["tflops"][name] = {"forward": flops_fwd / t_fwd / 1e12,
                                   "forward_backward": 3.5 * flops_fwd / t_both / 1e12}
            print(f"ref {m:2d}x ({layout.ref_len:7d} tok)  {name:7s} fwd {t_fwd * 1e3:9.2f} ms"
                  f"  fwd+bwd {t_both * 1e3:9.2f} ms  "
                  f"{row['tflops'][name]['forward']:.3f} / "
                  f"{row['tflops'][name]['forward_backward']:.3f} TFLOP/s")
        rows.append(row)

    first, last = rows[0], rows[-1]
    linearity = {}
    for name, t in last["times_s"].items():
        if t and first["times_s"].get(name):
            linearity[name] = {
                "time_ratio_forward": t["forward"] / first["times_s"][name]["forward"],
                "pair_ratio": last["allowed_pairs"] / first["allowed_pairs"]}
    result = {"device": device_name(), "jax": jax.__version__,
              "interpret_mode": not on_gpu and dev.platform != "tpu",
              "config": {k: v for k, v in vars(args).items() if k != "out"},
              "blocks": vars_of(blocks) if blocks else vars_of(BlockSizes()),
              "tuning": trials, "rows": rows, "linearity": linearity}
    path = write_json(result, args.out or os.path.join(RESULTS, f"sra_kernel_{device_tag()}.json"),
                      indent=2)
    print(f"device: {result['device']}\nlinearity: {linearity}\nwrote {path}")
    plot(result, path[:-len(".json")] + ".png" if path.endswith(".json") else path + ".png")
    return 0


def plot(result: dict, path: str) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return
    fig, (ax_t, ax_f) = plt.subplots(1, 2, figsize=(11, 4))
    names = sorted({n for r in result["rows"] for n, t in r["times_s"].items() if t})
    for name in names:
        pts = [(r["ref_multiple"], r["times_s"][name], r["tflops"][name]) for r in result["rows"]
               if r["times_s"].get(name)]
        xs = [p[0] for p in pts]
        for phase, style in (("forward", "-o"), ("forward_backward", "--s")):
            ax_t.plot(xs, [p[1][phase] * 1e3 for p in pts], style, label=f"{name} {phase}")
            ax_f.plot(xs, [p[2][phase] for p in pts], style, label=f"{name} {phase}")
    ax_t.set(xlabel="reference length / GEN length", ylabel="time (ms)", yscale="log",
             title="SRA time")
    ax_f.set(xlabel="reference length / GEN length", ylabel="TFLOP/s (allowed pairs)",
             title="SRA throughput")
    for ax in (ax_t, ax_f):
        ax.set_xscale("log", base=2)
    ax_t.legend(fontsize=7)
    fig.suptitle(result["device"])
    fig.tight_layout()
    fig.savefig(path + ".tmp.png", dpi=120)
    os.replace(path + ".tmp.png", path)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
