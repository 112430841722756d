"""Where a jitted step's device time goes: one profiled call, summed per kernel and per kind.

An MFU figure says how far a step is from the peak, not why. ``profile_call`` runs a function
once under ``jax.profiler`` and reads the trace back with ``jax.profiler.ProfileData`` (no
TensorBoard needed): the device's kernel events, summed by name and sorted, plus a split into
kinds (matrix products, attention kernels, collectives, the rest: fusions of elementwise work,
copies, reductions).
"""

from __future__ import annotations

import collections
import glob
import os
import tempfile
from typing import Any, Callable

# Substrings of kernel names, first match wins (lower case).
KINDS = (
    ("attention", ("sra_", "sdpa", "flash", "fmha", "attention")),
    ("matmul", ("gemm", "nvjet", "xmma", "cutlass", "matmul", "dot", "wgmma")),
    ("collective", ("nccl", "all-reduce", "all-gather", "reduce-scatter", "all-to-all")),
    ("copy", ("memcpy", "memset", "copy", "transpose")),
)


def kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, needles in KINDS:
        if any(n in low for n in needles):
            return kind
    return "other"


def _stats(event) -> dict[str, str]:
    """An event's public stats (the HLO op, the JAX op name, kernel details), shortened."""
    return {k: str(v)[:300] for k, v in event.stats if not k.startswith("_")}


def _device_events(profile) -> list[tuple[str, float, Any]]:
    """(kernel name, seconds, event) of every event on the device planes' stream lines.

    Without a device plane (the CPU backend) the XLA thread lines of the host plane count."""
    events = []
    planes = [p for p in profile.planes if p.name.startswith("/device:")]
    if not planes:
        for plane in profile.planes:
            if plane.name == "/host:CPU":
                for line in plane.lines:
                    if line.name.startswith("tf_XLA"):
                        events += [(e.name, e.duration_ns * 1e-9, e) for e in line.events]
        return events
    for plane in planes:
        lines = list(plane.lines)
        streams = [ln for ln in lines if ln.name.startswith("Stream")]
        # XLA's op and module lines repeat the stream events at a coarser level: use the
        # streams where they exist, otherwise whatever the plane has (CPU, TPU).
        for line in streams or [ln for ln in lines if ln.name not in ("XLA Modules", "Steps")]:
            for event in line.events:
                events.append((event.name, event.duration_ns * 1e-9, event))
    return events


def summarize(events: list[tuple], top: int = 25) -> dict[str, Any]:
    """Seconds per kernel name and per kind; each top kernel keeps its first event's stats."""
    by_name = collections.Counter()
    calls = collections.Counter()
    first = {}
    for name, seconds, *event in events:
        by_name[name] += seconds
        calls[name] += 1
        if event and name not in first:
            first[name] = _stats(event[0])
    total = sum(by_name.values())
    kinds = collections.Counter()
    for name, seconds in by_name.items():
        kinds[kernel_kind(name)] += seconds
    return {
        "device_seconds": total,
        "kinds": {k: {"seconds": s, "fraction": s / total if total else 0.0}
                  for k, s in kinds.most_common()},
        "top_kernels": [{"name": n[:160], "kind": kernel_kind(n), "seconds": s, "calls": calls[n],
                         "fraction": s / total if total else 0.0, "stats": first.get(n, {})}
                        for n, s in by_name.most_common(top)],
    }


def profile_call(fn: Callable[[], Any], *, top: int = 200) -> dict[str, Any]:
    """Run ``fn()`` (which must block until its device work is done) under the profiler."""
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            fn()
        paths = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        if not paths:
            raise RuntimeError(f"the profiler wrote no .xplane.pb under {tmp}")
        profile = jax.profiler.ProfileData.from_file(paths[0])
        return summarize(_device_events(profile), top)


def format_summary(summary: dict[str, Any], top: int = 25) -> str:
    lines = [f"device time {summary['device_seconds']:.3f} s"]
    for kind, v in summary["kinds"].items():
        lines.append(f"  {kind:<11} {v['seconds']:8.3f} s  {100 * v['fraction']:5.1f} %")
    lines.append("top kernels:")
    for k in summary["top_kernels"][:top]:
        lines.append(f"  {k['seconds']:8.4f} s {100 * k['fraction']:5.1f} % x{k['calls']:<5} "
                     f"[{k['kind']}] {k['name'][:90]}")
    return "\n".join(lines)
