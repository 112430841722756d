"""An inference-only copy of a trainer checkpoint: what ``checkpoints/demo/`` is made from.

    python -m avatarv_jax.training.export WORKDIR OUT [--step N] \
        [--set sampling.text_scale=1 --set sampling.audio_scale=1]

A trainer step directory holds the optimizer state and the data iterator besides the weights;
inference needs neither. The copy keeps ``config.json`` and, of one step (the latest by
default), the items inference restores (``params``, ``ema``, ``frozen``) and the small ``train``
metadata, with Orbax's step metadata listing only those, so the copy restores through the same
``restore_models`` / ``infer.py --checkpoint`` path as the work directory. ``--set KEY=VALUE``
changes a leaf of the copied config (VALUE read as JSON, else as text, and of the leaf's type),
e.g. the sampling defaults ``infer.py`` will use. Written under a temporary name and renamed,
so a failed export leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from avatarv_jax.training.checkpoints import CHECKPOINT_DIR, resolve_step_dir

INFERENCE_ITEMS = ("params", "ema", "frozen", "train")
STEP_METADATA = "_CHECKPOINT_METADATA"


def _parse_value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def apply_overrides(config: dict, overrides: list[str]) -> dict:
    """``config`` with each ``a.b.c=VALUE`` set; the key must already exist (typos fail)."""
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--set must be KEY=VALUE, got {item!r}")
        node, parts = config, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"--set {item}: the config has no {key!r}")
            node = node[part]
        leaf = parts[-1]
        if not isinstance(node, dict) or leaf not in node:
            raise ValueError(f"--set {item}: the config has no {key!r}")
        old, new = node[leaf], _parse_value(value)
        if isinstance(old, float) and isinstance(new, int) and not isinstance(new, bool):
            new = float(new)                       # "1" for a float field means 1.0
        if old is not None and type(new) is not type(old):
            raise ValueError(f"--set {item}: {key} holds a {type(old).__name__} "
                             f"({old!r}), not a {type(new).__name__}")
        node[leaf] = new
    return config


def export_inference(workdir, out, *, step: int | None = None,
                     overrides: list[str] = ()) -> Path:
    """Copy ``workdir``'s checkpoint (``step``, else the latest) to ``out`` for inference."""
    workdir, out = Path(workdir), Path(out)
    config_file = workdir / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{workdir} is not a trainer work directory (no config.json)")
    source = (workdir / CHECKPOINT_DIR / str(step)) if step is not None \
        else resolve_step_dir(workdir)
    if not (source / "params").is_dir():
        raise ValueError(f"{workdir} has no checkpoint at step {step}")
    missing = [i for i in INFERENCE_ITEMS if i != "ema" and not (source / i).is_dir()]
    if missing:
        raise ValueError(f"checkpoint {source} lacks {', '.join(missing)}")
    if out.exists():
        raise ValueError(f"{out} already exists; remove it or choose another name")
    config = apply_overrides(json.loads(config_file.read_text()), list(overrides))

    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        target = tmp / CHECKPOINT_DIR / source.name
        target.mkdir(parents=True)
        kept = [i for i in INFERENCE_ITEMS if (source / i).is_dir()]
        for item in kept:
            shutil.copytree(source / item, target / item)
        if (source / "commit_success.txt").is_file():
            shutil.copy2(source / "commit_success.txt", target / "commit_success.txt")
        if (source / STEP_METADATA).is_file():
            meta = json.loads((source / STEP_METADATA).read_text())
            handlers = meta.get("item_handlers") or {}
            meta["item_handlers"] = {k: v for k, v in handlers.items() if k in kept}
            (target / STEP_METADATA).write_text(json.dumps(meta))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workdir", help="trainer work directory")
    parser.add_argument("out", help="new directory for the inference-only copy")
    parser.add_argument("--step", type=int, default=None, help="step to export (the latest)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="change a config leaf in the copy, e.g. sampling.text_scale=1")
    args = parser.parse_args(argv)
    try:
        path = export_inference(args.workdir, args.out, step=args.step, overrides=args.set)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    print(f"wrote {path} ({size / 2**20:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
