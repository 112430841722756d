"""Checkpoints: an Orbax CheckpointManager over ``WORKDIR/checkpoints/<step>/``.

Items of a step (DESIGN §10): ``params`` (the DiT's parameters, pure dict), ``opt_state``,
``ema`` (when on), ``aux`` (a stage's second trained model, DMD's fake score, with its
optimizer state), ``frozen`` (text encoder, audio encoder, VAE, and in stages 4-5 the frozen
teacher or reference DiT ``teacher``, as pure dicts), ``train``
(JSON: step, NaN-guard count, stage) and ``data`` (the Grain iterator state, one file per
process). Saves are asynchronous; restores take abstract targets carrying the shardings of
the *current* mesh, so a checkpoint written on one mesh restores onto another.

``restore_models`` is what inference uses: a workdir (latest step) or a step directory into
the given NNX modules, in place, after checking every name and shape.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from flax import nnx

CHECKPOINT_DIR = "checkpoints"
FROZEN_MODELS = ("text_encoder", "audio_encoder", "vae")


class CheckpointMismatchError(ValueError):
    """The checkpoint's parameters do not fit the modules (names or shapes)."""


def _grain_iterator(it) -> bool:
    try:
        import grain
    except ImportError:  # pragma: no cover - grain is a dependency of the trainer
        return False
    return isinstance(it, (grain.DatasetIterator, grain.DataLoaderIterator))


def _data_save_args(it):
    import grain
    if _grain_iterator(it):
        return grain.checkpoint.CheckpointSave(it)
    state = it.get_state()
    if isinstance(state, bytes):
        state = {"__bytes__": state.decode("utf-8")}
    return ocp.args.JsonSave(state)


def _data_restore(manager: ocp.CheckpointManager, step: int, it) -> None:
    import grain
    if _grain_iterator(it):
        manager.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it)))
        return
    state = manager.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    if isinstance(state, dict) and set(state) == {"__bytes__"}:
        state = state["__bytes__"].encode("utf-8")
    it.set_state(state)


class TrainCheckpointer:
    """Save/restore the TrainState, frozen models and data iterator of one workdir."""

    def __init__(self, workdir: str | os.PathLike, *, every_steps: int, keep: int,
                 async_save: bool = True):
        self.directory = Path(workdir).absolute() / CHECKPOINT_DIR
        self.every_steps = max(int(every_steps), 1)
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=int(keep), enable_async_checkpointing=bool(async_save), create=True))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, state, frozen: Mapping[str, Any], data_iterator, *, stage: str,
             force: bool = False) -> bool:
        """Save when the step is due (every ``every_steps``) or ``force``; returns whether it did."""
        step = int(jax.device_get(state.step))
        if not force and step % self.every_steps:
            return False
        if step in self.manager.all_steps():
            return False
        items = dict(params=ocp.args.StandardSave(state.params),
                     opt_state=ocp.args.StandardSave(state.opt_state),
                     frozen=ocp.args.StandardSave(dict(frozen)),
                     train=ocp.args.JsonSave({"step": step, "stage": stage,
                                              "bad_steps": int(jax.device_get(state.bad_steps))}))
        if state.ema is not None:
            items["ema"] = ocp.args.StandardSave(state.ema)
        if state.aux is not None:
            items["aux"] = ocp.args.StandardSave(state.aux)
        if data_iterator is not None:
            items["data"] = _data_save_args(data_iterator)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

    def restore(self, abstract_state, abstract_frozen: Mapping[str, Any], data_iterator,
                step: int | None = None):
        """(state, frozen) of ``step`` (default latest), placed by the abstract targets'
        shardings; the data iterator is moved to the saved position in place."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        items = dict(params=ocp.args.StandardRestore(abstract_state.params),
                     opt_state=ocp.args.StandardRestore(abstract_state.opt_state),
                     frozen=ocp.args.StandardRestore(dict(abstract_frozen)),
                     train=ocp.args.JsonRestore())
        if abstract_state.ema is not None:
            items["ema"] = ocp.args.StandardRestore(abstract_state.ema)
        if abstract_state.aux is not None:
            items["aux"] = ocp.args.StandardRestore(abstract_state.aux)
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        if data_iterator is not None:
            _data_restore(self.manager, step, data_iterator)
        meta = out["train"]
        state = abstract_state.replace(
            step=_scalar(meta["step"], abstract_state.step),
            bad_steps=_scalar(meta["bad_steps"], abstract_state.bad_steps),
            params=out["params"], opt_state=out["opt_state"],
            ema=out["ema"] if abstract_state.ema is not None else None,
            aux=out["aux"] if abstract_state.aux is not None else None)
        return state, out["frozen"], meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _scalar(value, like) -> jax.Array:
    return jax.device_put(np.asarray(value, like.dtype), like.sharding)


# -- reading a checkpoint without the trainer --------------------------------------------------

def resolve_step_dir(path: str | os.PathLike) -> Path:
    """A workdir (its latest step), a ``checkpoints`` directory, or a step directory."""
    path = Path(path).absolute()
    if (path / "params").is_dir():
        return path
    for root in (path / CHECKPOINT_DIR, path):
        if root.is_dir():
            steps = sorted((int(p.name) for p in root.iterdir()
                            if p.name.isdigit() and (p / "params").is_dir()), reverse=True)
            if steps:
                return root / str(steps[0])
    raise FileNotFoundError(f"{path} holds no checkpoint (expected a workdir with "
                            f"{CHECKPOINT_DIR}/<step>/params or a step directory)")


def read_item_shapes(step_dir: Path, item: str) -> dict[str, tuple]:
    """'/'-joined parameter path -> shape of one saved item."""
    meta = ocp.StandardCheckpointer().metadata(step_dir / item).item_metadata.tree
    flat = jax.tree_util.tree_flatten_with_path(
        meta, is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, Mapping))[0]
    return {_path_name(p): tuple(m.shape) for p, m in flat}


def _path_name(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _shapes(tree) -> dict[str, tuple]:
    return {_path_name(p): tuple(np.shape(x))
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_fits(saved: Mapping[str, tuple], expected: Mapping[str, tuple], what: str) -> None:
    """Raise CheckpointMismatchError naming the first mismatches (missing, extra, shape)."""
    problems = []
    for name in sorted(set(expected) | set(saved)):
        if name not in saved:
            problems.append(f"{name}: missing from the checkpoint (model expects "
                            f"{expected[name]})")
        elif name not in expected:
            problems.append(f"{name}: in the checkpoint {saved[name]} but not in the model")
        elif tuple(saved[name]) != tuple(expected[name]):
            problems.append(f"{name}: checkpoint shape {saved[name]} != model shape "
                            f"{expected[name]}")
    if problems:
        shown = "; ".join(problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointMismatchError(f"{what} does not fit the checkpoint: {shown}{more}")


@contextlib.contextmanager
def _quiet_item_restore():
    """Orbax warns that an item directory has no step metadata (it lives one level up, in the
    step directory): true and expected when one item is restored on its own, so not shown."""
    level = absl_logging.get_verbosity()
    absl_logging.set_verbosity(min(level, absl_logging.ERROR))   # lower = quieter
    try:
        yield
    finally:
        absl_logging.set_verbosity(level)


@_quiet_item_restore()
def _restore_into(module: nnx.Module, step_dir: Path, item: str, sub: str | None = None):
    state = nnx.state(module, nnx.Param)
    pure = nnx.to_pure_dict(state)
    saved = read_item_shapes(step_dir, item)
    if sub is not None:
        saved = {k[len(sub) + 1:]: v for k, v in saved.items() if k.startswith(sub + "/")}
    check_fits(saved, _shapes(pure), f"{type(module).__name__} ({item}{'/' + sub if sub else ''})")
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          pure)
    if sub is not None:
        # Restore only this model's subtree of the item.
        full = {sub: target}
        restored = ocp.PyTreeCheckpointer().restore(
            step_dir / item, args=ocp.args.PyTreeRestore(
                item=full, restore_args=jax.tree.map(
                    lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), full),
                partial_restore=True))[sub]
    else:
        restored = ocp.StandardCheckpointer().restore(step_dir / item, target)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(module, state)


@_quiet_item_restore()
def restore_models(path: str | os.PathLike, models: Mapping[str, nnx.Module], *,
                   use_ema: bool = True) -> int:
    """Restore the DiT (``models['dit']``; EMA weights when saved and ``use_ema``) and every
    frozen model present in both the checkpoint and ``models``, in place. Returns the step.

    Raises CheckpointMismatchError naming the first mismatching parameters.
    """
    step_dir = resolve_step_dir(path)
    if "dit" in models:
        item = "ema" if use_ema and (step_dir / "ema").is_dir() else "params"
        _restore_into(models["dit"], step_dir, item)
    if (step_dir / "frozen").is_dir():
        saved_models = {k.split("/")[0] for k in read_item_shapes(step_dir, "frozen")}
        for name in FROZEN_MODELS:
            if name in models and name in saved_models:
                _restore_into(models[name], step_dir, "frozen", sub=name)
    train_meta = step_dir / "train" / "metadata"
    if train_meta.is_file():
        return int(json.loads(train_meta.read_text())["step"])
    return int(step_dir.name) if step_dir.name.isdigit() else 0
