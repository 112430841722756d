"""Split a profiled step's device time by phase (forward, recomputed forward, backward,
optimizer) and kind (attention, matmul, other, copy).

    XLA_FLAGS="--xla_gpu_enable_command_buffer= --xla_dump_to=DUMP --xla_dump_hlo_as_text" \
        python benchmarks/train_step.py --model avatar_v_1_3b --gpu-figure --profile --tag attr
    python benchmarks/attribute_profile.py RESULT.json DUMP/*jit_step_fn*after_optimizations.txt

Kernels name their HLO op only with command buffers off (otherwise every kernel belongs to a
``command_buffer_N``); the op's ``op_name`` metadata in the optimized HLO tells the phase:
``rematted_computation`` is recomputation, ``transpose(jvp(...))`` the backward, ``jvp(...)``
the forward, the rest the optimizer update. Writes ``RESULT_phases.json`` beside the input.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from avatarv_jax.tools.bench_io import write_json  # noqa: E402


def phase(op_name: str | None) -> str:
    if op_name is None:
        return "unknown"
    if "rematted_computation" in op_name:
        return "recompute"
    if "transpose(jvp" in op_name:
        return "backward"
    if "jvp(" in op_name:
        return "forward"
    return "optimizer"


def op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> its JAX op_name metadata."""
    pattern = r'^\s*(?:ROOT )?%(\S+) = .*?metadata=\{op_name="([^"]*)"'
    return {m.group(1): m.group(2) for m in re.finditer(pattern, hlo_text, re.M)}


def attribute(profile: dict, hlo_text: str) -> dict:
    names = op_names(hlo_text)
    table = collections.defaultdict(float)
    for kernel in profile["top_kernels"]:
        op = names.get(kernel.get("stats", {}).get("hlo_op", ""))
        table[(phase(op), kernel["kind"])] += kernel["seconds"]
    covered = sum(table.values())
    phases = collections.defaultdict(dict)
    for (p, kind), seconds in sorted(table.items()):
        phases[p][kind] = seconds
    return {"device_seconds": profile["device_seconds"], "kernels_covered_seconds": covered,
            "phases": {p: dict(v, total=sum(v.values())) for p, v in phases.items()}}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", help="train_step JSON written with --profile")
    parser.add_argument("hlo", help="the step's optimized HLO text (XLA dump)")
    args = parser.parse_args()
    try:
        with open(args.result, encoding="utf-8") as f:
            result = json.load(f)
        with open(args.hlo, encoding="utf-8") as f:
            hlo = f.read()
    except (OSError, json.JSONDecodeError) as e:
        sys.exit(f"error: {e}")
    if "profile" not in result:
        sys.exit(f"error: {args.result} has no profile (run train_step.py with --profile)")
    out = attribute(result["profile"], hlo)
    out.update(device=result.get("device"), step_s=result.get("step_s"),
               attention_impl=result.get("attention_impl"), remat=result.get("remat"))
    for p, kinds in out["phases"].items():
        print(f"{p:<10} " + "  ".join(f"{k} {v:.3f}" for k, v in kinds.items()))
    path = os.path.splitext(args.result)[0] + "_phases.json"
    write_json(out, path, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
