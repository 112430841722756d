"""Sparse Reference Attention: time against reference length, Pallas kernel vs baselines.

    python benchmarks/sra_kernel.py                 # GPU: the issue's shapes (GEN = 32,760)
    python benchmarks/sra_kernel.py --quick         # tiny shapes (what runs on a CPU)

For a fixed GEN length and reference lengths of 1x..16x of it, times the forward and the
forward+backward of:

- ``pallas``: the block-sparse kernel (``kernels/sra_pallas.py``; interpret mode on CPU, so
  CPU times say nothing about GPU speed);
- ``xla``: the dense-mask reference (skipped where its [B, H, S, S] logits would not fit);
- ``cudnn`` (GPU only): the strongest composition of library kernels: GEN rows by one
  ``jax.nn.dot_product_attention(implementation="cudnn")`` over the concatenated REF+GEN keys
  (the public API returns no log-sum-exp, so the two key segments are joined rather than
  merged by LSE) and REF rows by a second call batched per latent frame (``ref_window=0``).

TFLOP/s count only allowed query-key pairs (``SRALayout.allowed_pairs``): 4 flops per pair and
head dim forward, 2.5x that backward. Saves JSON to ``benchmarks/results/sra_kernel_<dev>.json``
and, when matplotlib is installed, a PNG of time and TFLOP/s against reference length.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp

from avatarv_jax.kernels.sra_layout import SRALayout
from avatarv_jax.kernels.sra_pallas import BlockSizes, sra_pallas
from avatarv_jax.kernels.sra_reference import sra_reference
from avatarv_jax.tools.bench_io import device_name, device_tag, write_json

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def cudnn_composition(layout: SRALayout):
    """REF rows per frame + GEN rows over [REF | GEN], two cuDNN attention calls."""
    if layout.ref_window != 0 or layout.gen_window != -1:
        raise ValueError("the cuDNN composition covers ref_window=0, gen_window=-1 only")
    t = layout.tokens_per_frame

    def fn(q_ref, k_ref, v_ref, q_gen, k_gen, v_gen):
        b, _, h, d = q_ref.shape

        def per_frame(x):
            return x.reshape(b * layout.ref_frames, t, h, d)

        o_ref = jax.nn.dot_product_attention(per_frame(q_ref), per_frame(k_ref),
                                             per_frame(v_ref), implementation="cudnn")
        o_gen = jax.nn.dot_product_attention(
            q_gen, jnp.concatenate([k_ref, k_gen], 1), jnp.concatenate([v_ref, v_gen], 1),
            implementation="cudnn")
        return o_ref.reshape(q_ref.shape), o_gen
    return fn


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
    blocks = None if on_gpu else BlockSizes(32, 32, 32, 32)

    rows = []
    for m in multiples:
        layout = SRALayout(m * args.gen_frames, args.gen_frames, args.tokens_per_frame,
                           ref_window=args.ref_window)
        keys = jax.random.split(jax.random.key(m), 6)
        lens = [layout.ref_len] * 3 + [layout.gen_len] * 3
        inputs = [jax.random.normal(k, (args.batch, n, args.heads, args.head_dim), dtype)
                  for k, n in zip(keys, lens)]
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
              "rows": rows, "linearity": linearity}
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
