"""Convert a public checkpoint once into an Orbax checkpoint of our module state, for fast loads.

    python -m avatarv_jax.io.convert --kind umt5 --source Wan2.1-T2V-14B-Diffusers \\
        --dest converted/umt5_xxl
    python -m avatarv_jax.io.convert --kind wan_dit --source Wan2.1-T2V-1.3B-Diffusers \\
        --dest converted/dit_1_3b --config configs/avatar_v_1_3b.py

The importers (``wan_dit``, ``wan_vae``, ``umt5``, ``wav2vec2``) map names, transpose and stack layers on
every load; converting once stores the result as our own pytree, which Orbax restores
directly. The destination holds:

- ``state/``: ``nnx.state(module)`` as a pure dict (``StandardCheckpointer``);
- ``avatarv_convert.json``: the kind, the source, the model config (so the module can be
  rebuilt without the original files) and the import report.

Everything is written into a temporary sibling of ``--dest`` and renamed at the end, so a
failed conversion leaves nothing behind. Bad input exits with status 2 and one message.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from avatarv_jax.io.import_report import (
    CheckpointMismatchError,
    ImportReport,
    check_names_and_shapes,
)
from avatarv_jax.io.safetensors_io import UnsupportedCheckpointError

KINDS = ("wan_dit", "wan_vae", "umt5", "wav2vec2")
METADATA = "avatarv_convert.json"
STATE = "state"
FORMAT = "avatarv_jax.convert/1"


class ConversionError(ValueError):
    """The conversion request cannot be carried out (bad kind, config, paths...)."""


# --- configs -------------------------------------------------------------------------------

def load_config_file(spec: str):
    """``path.py`` or ``path.py:arg`` -> the module's ``get_config(arg)`` (as ``--config`` takes)."""
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise ConversionError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"_avatarv_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:  # a broken config file: report it as bad input
        raise ConversionError(f"could not load config file {path}: {e!r}") from e
    if not hasattr(module, "get_config"):
        raise ConversionError(f"config file {path} defines no get_config()")
    return module.get_config(arg) if arg else module.get_config()


def _model_classes(kind: str):
    """(config dataclass, module class) of ``kind``; imported lazily."""
    if kind == "wan_dit":
        from avatarv_jax.models.dit import DiT, DiTConfig
        return DiTConfig, DiT
    if kind == "wan_vae":
        from avatarv_jax.models.vae import CausalVideoVAE, VAEConfig
        return VAEConfig, CausalVideoVAE
    if kind == "umt5":
        from avatarv_jax.models.text_encoder import T5Encoder, TextEncoderConfig
        return TextEncoderConfig, T5Encoder
    if kind == "wav2vec2":
        from avatarv_jax.models.wav2vec2 import Wav2Vec2Config, Wav2Vec2Encoder
        return Wav2Vec2Config, Wav2Vec2Encoder
    raise ConversionError(f"unknown kind {kind!r}; expected one of {', '.join(KINDS)}")


def build_module(kind: str, model_cfg) -> nnx.Module:
    """A freshly initialised module of ``kind`` (use under ``nnx.eval_shape`` for no memory)."""
    _, cls = _model_classes(kind)
    if kind in ("umt5", "wav2vec2"):
        return cls(model_cfg, nnx.Rngs(0))
    return cls(model_cfg, rngs=nnx.Rngs(0))


def config_to_json(model_cfg) -> dict[str, Any]:
    """A model config dataclass as JSON: tuples as lists, dtype objects as ``{"dtype": name}``."""
    out = {}
    for f in dataclasses.fields(model_cfg):
        v = getattr(model_cfg, f.name)
        if isinstance(v, str) or v is None or isinstance(v, (bool, int, float)):
            out[f.name] = v
        elif isinstance(v, (tuple, list)):
            out[f.name] = list(v)
        else:
            try:
                out[f.name] = {"dtype": jnp.dtype(v).name}
            except TypeError:
                raise ConversionError(f"config field {f.name}={v!r} cannot be saved") from None
    return out


def config_from_json(kind: str, values: dict[str, Any]):
    """Inverse of ``config_to_json`` for the config dataclass of ``kind``."""
    cls, _ = _model_classes(kind)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in values:
            continue
        v = values[f.name]
        if isinstance(v, dict) and set(v) == {"dtype"}:
            v = getattr(jnp, v["dtype"])
        elif isinstance(v, list):
            v = tuple(v)
        kwargs[f.name] = v
    unknown = set(values) - set(kwargs)
    if unknown:
        raise ConversionError(f"saved {kind} config has unknown fields {sorted(unknown)}")
    return cls(**kwargs)


def _model_config_from(kind: str, config) -> Any:
    """The model config of ``kind`` selected by a full ``get_model_config`` ConfigDict."""
    from avatarv_jax.models import factory
    try:
        if kind == "wan_dit":
            return factory.dit_config(config)
        if kind == "wan_vae":
            return factory.vae_config(config)
        if kind == "wav2vec2":
            raise ConversionError("model configs hold no wav2vec2 settings: leave out --config "
                                  "(the checkpoint's config.json is read)")
        return factory.text_encoder_config(config)
    except (AttributeError, KeyError) as e:
        raise ConversionError(f"the config has no {kind} settings: {e}") from None


def _import(kind: str, source: Path, model_cfg):
    if kind == "wan_dit":
        from avatarv_jax.io.wan_dit import import_wan_dit
        if model_cfg is None:
            raise ConversionError("--kind wan_dit needs --config: the Avatar V modules Wan "
                                  "lacks (audio, motion, ...) are sized by the model config")
        return import_wan_dit(source, model_cfg)
    if kind == "wan_vae":
        from avatarv_jax.io.wan_vae import import_wan_vae
        return import_wan_vae(source, model_cfg)
    if kind == "wav2vec2":
        from avatarv_jax.io.wav2vec2 import import_wav2vec2
        return import_wav2vec2(source, model_cfg)
    from avatarv_jax.io.umt5 import import_umt5
    return import_umt5(source, model_cfg)


# --- convert / load ------------------------------------------------------------------------

def convert(kind: str, source: str | Path, dest: str | Path, *, config=None,
            model_cfg=None) -> ImportReport:
    """Import ``source`` as ``kind`` and save its state to ``dest`` (which must not exist).

    ``config``: a full model ConfigDict (``get_model_config``), from which the ``kind``'s
    config is taken; ``model_cfg``: that config directly (``DiTConfig``...). Both optional for
    ``wan_vae``, ``umt5`` and ``wav2vec2`` (their ``config.json`` is read).
    """
    _model_classes(kind)                                   # validates kind
    source, dest = Path(source), Path(dest).absolute()
    if not source.exists():
        raise FileNotFoundError(f"no checkpoint at {source}")
    if dest.exists():
        raise FileExistsError(f"{dest} already exists; remove it or choose another --dest")
    if model_cfg is None and config is not None:
        model_cfg = _model_config_from(kind, config)

    module, report = _import(kind, source, model_cfg)
    model_cfg = module.cfg if hasattr(module, "cfg") else model_cfg
    state = nnx.to_pure_dict(nnx.state(module))
    metadata = {"format": FORMAT, "kind": kind, "source": str(source.absolute()),
                "config": config_to_json(model_cfg), "report": str(report),
                "parameters": int(sum(np.prod(x.shape) for x in jax.tree.leaves(state)))}

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)                      # mkdtemp's 0700 -> a normal folder
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(tmp / STATE, state)
        checkpointer.wait_until_finished()
        checkpointer.close()
        (tmp / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
        os.rename(tmp, dest)                               # fails if dest appeared meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def read_metadata(dest: str | Path) -> dict[str, Any]:
    """The ``avatarv_convert.json`` of a converted checkpoint."""
    dest = Path(dest)
    file = dest / METADATA
    if not file.is_file() or not (dest / STATE).is_dir():
        raise FileNotFoundError(f"{dest} is not a converted checkpoint (no {METADATA} and "
                                f"{STATE}/); create one with python -m avatarv_jax.io.convert")
    metadata = json.loads(file.read_text())
    if metadata.get("format") != FORMAT:
        raise ConversionError(f"{file}: unknown format {metadata.get('format')!r}")
    return metadata


def converted_config(dest: str | Path):
    """The model config dataclass saved with a converted checkpoint."""
    metadata = read_metadata(dest)
    return config_from_json(metadata["kind"], metadata["config"])


def load_converted(dest: str | Path,
                   module_builder: Callable[[], nnx.Module] | None = None) -> nnx.Module:
    """Restore a converted checkpoint into a module built by ``module_builder``.

    ``module_builder`` is called under ``nnx.eval_shape`` (no parameter memory is allocated
    before the restore); it defaults to the module of the saved kind and config. Every name
    and shape is checked against the saved state first, in one error.
    """
    dest = Path(dest).absolute()
    metadata = read_metadata(dest)
    if module_builder is None:
        model_cfg = config_from_json(metadata["kind"], metadata["config"])
        module_builder = lambda: build_module(metadata["kind"], model_cfg)
    abstract = nnx.eval_shape(module_builder)
    graphdef, abstract_state = nnx.split(abstract)
    target = nnx.to_pure_dict(abstract_state)

    checkpointer = ocp.StandardCheckpointer()
    try:
        saved = checkpointer.metadata(dest / STATE)
        saved = getattr(saved, "item_metadata", saved)
        saved_tree = getattr(saved, "tree", saved)
        expected = {_key(p): tuple(x.shape) for p, x in
                    jax.tree_util.tree_flatten_with_path(target)[0]}
        found = {_key(p): tuple(x.shape) for p, x in
                 jax.tree_util.tree_flatten_with_path(saved_tree)[0]}
        check_names_and_shapes(expected, found, source=str(dest / STATE),
                               hint=f"(converted as {metadata['kind']} from "
                                    f"{metadata['source']}; does module_builder match?)")
        restored = checkpointer.restore(dest / STATE, target)
    finally:
        checkpointer.close()
    nnx.replace_by_pure_dict(abstract_state, restored)
    return nnx.merge(graphdef, abstract_state)


def _key(path) -> str:
    parts = []
    for k in path:
        parts.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
    return ".".join(parts)


# --- CLI -----------------------------------------------------------------------------------

_BAD_INPUT = (ConversionError, FileNotFoundError, FileExistsError, NotADirectoryError,
              UnsupportedCheckpointError, CheckpointMismatchError, ValueError)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m avatarv_jax.io.convert",
        description="Import a public checkpoint once and save it as an Orbax checkpoint of our "
                    "module state (load it with avatarv_jax.io.convert.load_converted).")
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--source", required=True,
                        help="checkpoint folder, pipeline root, .safetensors file or index")
    parser.add_argument("--dest", required=True, help="output folder (must not exist)")
    parser.add_argument("--config", default=None,
                        help="model config file, e.g. configs/avatar_v_1_3b.py (required for "
                             "wan_dit; for wan_vae / umt5 it is checked against config.json; not used "
                             "for wav2vec2)")
    args = parser.parse_args(argv)
    try:
        config = load_config_file(args.config) if args.config else None
        report = convert(args.kind, args.source, args.dest, config=config)
    except _BAD_INPUT as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report)
    print(f"saved to {Path(args.dest).absolute()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
