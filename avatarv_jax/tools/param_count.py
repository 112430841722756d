"""Parameter counts per module, from ``nnx.eval_shape`` (nothing is allocated).

    python -m avatarv_jax.tools.param_count --config configs/avatar_v_1_3b.py
    python -m avatarv_jax.tools.param_count --config configs/avatar_v_14b.py:sr --json out.json

The DiT is split into the part with the Wan 2.1 T2V layout (importable from Wan weights) and
the modules Avatar V adds (audio cross-attention, motion stream, REF handling, SR condition).
"""

from __future__ import annotations

import json
import math
import os

from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from avatarv_jax.models import factory
from avatarv_jax.models.audio_encoder import AudioEncoder
from avatarv_jax.models.dit import DiT
from avatarv_jax.models.text_encoder import T5Encoder
from avatarv_jax.models.vae import CausalVideoVAE

# Top-level DiT modules and per-block modules that Avatar V adds to the Wan 2.1 layout.
ADDED_TOP = {"ref_embedding": "REF handling", "cond_embedding": "SR condition",
             "audio_proj": "audio cross-attention", "audio_pos": "audio cross-attention",
             "motion_encoder": "motion stream", "motion_head": "motion stream"}
ADDED_BLOCK = {"norm_audio": "audio cross-attention", "attn_audio": "audio cross-attention"}
NOMINAL = {"avatar_v_1_3b": 1.3e9, "avatar_v_14b": 14e9}


def _size(variable) -> int:
    return math.prod(variable.shape)


def dit_breakdown(dit_cfg) -> dict[str, int]:
    """Counts of the Wan-compatible DiT part and of each added group."""
    abstract = nnx.eval_shape(lambda: DiT(dit_cfg, rngs=nnx.Rngs(0)))
    counts = {"wan_compatible": 0}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        names = [str(p) for p in path]
        group = ADDED_TOP.get(names[0])
        if names[0] == "blocks":
            group = ADDED_BLOCK.get(names[1])
        key = "wan_compatible" if group is None else group
        counts[key] = counts.get(key, 0) + _size(var)
    return counts


def dit_modules(dit_cfg) -> dict[str, int]:
    """Counts per DiT module: top-level modules, and each block submodule over all layers."""
    abstract = nnx.eval_shape(lambda: DiT(dit_cfg, rngs=nnx.Rngs(0)))
    counts: dict[str, int] = {}
    for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param)):
        names = [str(p) for p in path]
        key = ".".join(names[:2]) if names[0] == "blocks" else names[0]
        counts[key] = counts.get(key, 0) + _size(var)
    return counts


def module_count(build) -> int:
    abstract = nnx.eval_shape(build)
    return sum(_size(v) for _, v in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))


def count_all(cfg) -> dict:
    base = cfg.name.removesuffix("_sr")
    dit = dit_breakdown(factory.dit_config(cfg))
    report = {
        "config": cfg.name,
        "dit": dit,
        "dit_total": sum(dit.values()),
        "dit_modules": dit_modules(factory.dit_config(cfg)),
        "text_encoder": module_count(
            lambda: T5Encoder(factory.text_encoder_config(cfg), nnx.Rngs(0))),
        "audio_encoder": module_count(
            lambda: AudioEncoder(factory.audio_encoder_config(cfg), nnx.Rngs(0))),
        "vae": module_count(lambda: CausalVideoVAE(factory.vae_config(cfg), rngs=nnx.Rngs(0))),
    }
    if base in NOMINAL:
        report["wan_nominal"] = NOMINAL[base]
        report["wan_relative_difference"] = dit["wan_compatible"] / NOMINAL[base] - 1
    return report


def format_report(report: dict) -> str:
    lines = [f"config {report['config']}", "  DiT"]
    for name, n in report["dit"].items():
        label = "Wan 2.1-compatible part" if name == "wan_compatible" else f"+ {name}"
        lines.append(f"    {label:<32}{n:>16,}")
    lines.append(f"    {'DiT total':<32}{report['dit_total']:>16,}")
    if "wan_nominal" in report:
        lines.append(f"    Wan-compatible vs nominal {report['wan_nominal'] / 1e9:g}B: "
                     f"{100 * report['wan_relative_difference']:+.1f}%")
    lines.append("  DiT modules (blocks.* summed over layers)")
    for name, n in report["dit_modules"].items():
        lines.append(f"    {name:<32}{n:>16,}")
    for name in ("text_encoder", "audio_encoder", "vae"):
        lines.append(f"  {name:<34}{report[name]:>16,}")
    return "\n".join(lines)


def _cli():
    """Flags are defined here, not at import, so other CLIs can import this module."""
    config = config_flags.DEFINE_config_file("config", None, "model config file",
                                             lock_config=False)
    json_path = flags.DEFINE_string("json", None, "also write the counts to this JSON file")
    flags.mark_flag_as_required("config")

    def main(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {argv[1:]}")
        report = count_all(config.value)
        print(format_report(report))
        if json_path.value:
            with open(json_path.value + ".tmp", "w") as f:
                json.dump(report, f, indent=2)
            os.replace(json_path.value + ".tmp", json_path.value)

    app.run(main)


if __name__ == "__main__":
    _cli()
