"""Import Wan 2.1 T2V transformer weights (diffusers ``WanTransformer3DModel``) into our ``DiT``.

Our DiT keeps diffusers' names where the module exists in Wan, with a few renames and layout
changes (the table is ``_TOP`` / ``_BLOCK`` below):

- PyTorch ``Linear`` weights ``[out, in]`` become ``Dense`` kernels ``[in, out]``;
- the patch-embedding ``Conv3d`` ``[D, C, 1, ph, pw]`` becomes a ``Dense`` kernel over patch
  features ordered ``(ph, pw, C)`` (``models.dit.patchify``); ``proj_out``'s output features are
  ordered ``(pt, ph, pw, C)`` in both models, so it is a plain transpose;
- ``condition_embedder.{time_embedder,time_proj,text_embedder}`` lose the prefix;
- the per-block modules ``blocks.{i}.…`` are stacked on a leading layer axis (``blocks.…``),
  ``to_out.0`` -> ``to_out``, ``ffn.net.0.proj`` -> ``ffn_in``, ``ffn.net.2`` -> ``ffn_out``,
  norm ``weight`` -> ``scale``; the modulation tables lose their leading 1.

Modules Avatar V adds (reference embedding, audio cross-attention, motion stream, SR condition
embedding) are not in the checkpoint and keep their fresh initialisation; the report lists them.
Every name and shape is checked before anything is converted, so a wrong file or config fails
once, listing every offending key.
"""

from __future__ import annotations

import collections
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from avatarv_jax.io.import_report import (ImportReport, check_config_agrees,
                                          check_names_and_shapes)
from avatarv_jax.io.safetensors_io import SafetensorsCheckpoint, locate_checkpoint
from avatarv_jax.models.dit import DiT, DiTConfig

Path_ = tuple

# Our top-level parameter path -> diffusers key prefix (suffix: kernel -> weight, bias -> bias).
_TOP = {
    ("patch_embedding",): "patch_embedding",
    ("time_embedder", "linear_1"): "condition_embedder.time_embedder.linear_1",
    ("time_embedder", "linear_2"): "condition_embedder.time_embedder.linear_2",
    ("time_proj",): "condition_embedder.time_proj",
    ("text_embedder", "linear_1"): "condition_embedder.text_embedder.linear_1",
    ("text_embedder", "linear_2"): "condition_embedder.text_embedder.linear_2",
    ("proj_out",): "proj_out",
}
# Our per-block module path (under ``blocks``) -> diffusers key prefix under ``blocks.{i}``.
_BLOCK = {("norm2",): "norm2", ("ffn_in",): "ffn.net.0.proj", ("ffn_out",): "ffn.net.2"}
for _attn in ("attn1", "attn2"):
    for _proj in ("to_q", "to_k", "to_v", "norm_q", "norm_k"):
        _BLOCK[(_attn, _proj)] = f"{_attn}.{_proj}"
    _BLOCK[(_attn, "to_out")] = f"{_attn}.to_out.0"
_LEAF = {"kernel": "weight", "bias": "bias", "scale": "weight"}

# diffusers' WanTransformer3DModel defaults, for config.json files that omit a key.
_DIFFUSERS_DEFAULTS = {
    "patch_size": [1, 2, 2], "num_attention_heads": 40, "attention_head_dim": 128,
    "in_channels": 16, "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 13824,
    "num_layers": 40, "cross_attn_norm": True, "qk_norm": "rms_norm_across_heads", "eps": 1e-6,
    "image_dim": None, "added_kv_proj_dim": None, "pos_embed_seq_len": None}


def config_from_diffusers(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``DiTConfig`` fields a ``WanTransformer3DModel`` ``config.json`` fixes.

    Raises for options our DiT does not implement (I2V image conditioning, other qk norms).
    """
    c = {**_DIFFUSERS_DEFAULTS, **config}
    problems = []
    cls = c.get("_class_name", "WanTransformer3DModel")
    if cls != "WanTransformer3DModel":
        problems.append(f"_class_name is {cls!r}, expected 'WanTransformer3DModel'")
    if c["image_dim"] is not None or c["added_kv_proj_dim"] is not None:
        problems.append("image conditioning (image_dim / added_kv_proj_dim: Wan I2V) is not "
                        "supported; use a T2V checkpoint")
    if c["pos_embed_seq_len"] is not None:
        problems.append("pos_embed_seq_len is not supported")
    if c["qk_norm"] != "rms_norm_across_heads":
        problems.append(f"qk_norm={c['qk_norm']!r} (only 'rms_norm_across_heads')")
    if not c["cross_attn_norm"]:
        problems.append("cross_attn_norm=False is not supported")
    if problems:
        raise ValueError("unsupported WanTransformer3DModel config: " + "; ".join(problems))
    return {"dim": c["num_attention_heads"] * c["attention_head_dim"],
            "num_heads": c["num_attention_heads"], "num_layers": c["num_layers"],
            "ffn_dim": c["ffn_dim"], "in_channels": c["in_channels"],
            "out_channels": c["out_channels"], "patch_size": tuple(c["patch_size"]),
            "text_dim": c["text_dim"], "freq_dim": c["freq_dim"], "eps": c["eps"]}


def _wan_name(path: Path_) -> str | None:
    """Diffusers key (with ``{i}`` for the layer) of our parameter ``path``; None if not Wan's."""
    if path == ("scale_shift_table",):
        return "scale_shift_table"
    if path[0] == "blocks":
        if path[1:] == ("scale_shift_table",):
            return "blocks.{i}.scale_shift_table"
        prefix = _BLOCK.get(tuple(path[1:-1]))
        return None if prefix is None else f"blocks.{{i}}.{prefix}.{_LEAF[path[-1]]}"
    prefix = _TOP.get(tuple(path[:-1]))
    return None if prefix is None else f"{prefix}.{_LEAF[path[-1]]}"


def _torch_shape(path: Path_, shape: tuple[int, ...], cfg: DiTConfig) -> tuple[int, ...]:
    """The checkpoint shape of one (per-layer, for blocks) parameter of our ``shape``."""
    if path[-1] == "scale_shift_table":
        return (1, *shape)
    if path == ("patch_embedding", "kernel"):
        pt, ph, pw = cfg.patch_size
        return (shape[1], cfg.in_channels, pt, ph, pw)
    if path[-1] == "kernel":
        return (shape[1], shape[0])
    return tuple(shape)


def _to_ours(path: Path_, w: np.ndarray, cfg: DiTConfig) -> np.ndarray:
    if path[-1] == "scale_shift_table":
        return w[0]
    if path == ("patch_embedding", "kernel"):          # [D, C, 1, ph, pw] -> [(ph, pw, C), D]
        return w[:, :, 0].transpose(2, 3, 1, 0).reshape(-1, w.shape[0])
    if path[-1] == "kernel":
        return w.T
    return w


def _abstract(cfg: DiTConfig):
    abstract = nnx.eval_shape(lambda: DiT(cfg, rngs=nnx.Rngs(0)))
    return abstract, list(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))


def expected_shapes(cfg: DiTConfig) -> dict[str, tuple[int, ...]]:
    """Every ``WanTransformer3DModel`` key this config needs, with its PyTorch shape."""
    out = {}
    for p, v in _abstract(cfg)[1]:
        name = _wan_name(p)
        if name is None:
            continue
        shape = tuple(v.shape)
        if p[0] == "blocks":
            for i in range(cfg.num_layers):
                out[name.format(i=i)] = _torch_shape(p, shape[1:], cfg)
        else:
            out[name] = _torch_shape(p, shape, cfg)
    return out


def _fresh_values(cfg: DiTConfig, paths: list[Path_], seed: int) -> dict[Path_, jax.Array]:
    """Freshly initialised values of the parameters in ``paths`` (jit drops the other inits)."""
    if not paths:
        return {}
    wanted = set(paths)

    @jax.jit
    def init():
        flat = nnx.to_flat_state(nnx.state(DiT(cfg, rngs=nnx.Rngs(seed)), nnx.Param))
        return [v.get_value() for p, v in flat if p in wanted]

    order = [p for p, _ in _abstract(cfg)[1] if p in wanted]
    return dict(zip(order, init()))



def import_wan_dit(path: str | Path, dit_cfg: DiTConfig, *,
                   seed: int = 0) -> tuple[DiT, ImportReport]:
    """Load diffusers ``WanTransformer3DModel`` (Wan 2.1 T2V) weights into a new ``DiT``.

    ``path``: a diffusers transformer folder, a pipeline root with a ``transformer/`` folder, a
    ``.safetensors`` file or a sharded index. ``dit_cfg`` sets everything Wan does not
    (audio, motion, windows, dtype); when a ``config.json`` is found, its Wan sizes must agree
    with ``dit_cfg``. Parameters Wan does not have are initialised from ``seed``.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no Wan transformer checkpoint at {path}")
    path, config_file = locate_checkpoint(path, "transformer")
    cfg = dit_cfg
    notes = []
    if config_file is not None:
        wan = config_from_diffusers(json.loads(config_file.read_text()))
        check_config_agrees(cfg, wan, config_file, "import_wan_dit")
        notes.append(f"config checked against {config_file}")

    ckpt = SafetensorsCheckpoint(path)
    abstract, flat = _abstract(cfg)
    check_names_and_shapes(expected_shapes(cfg), ckpt.shapes(), source=ckpt.source)

    dtypes = collections.Counter()
    loaded, fresh_paths, tensors, wan_params = [], [], 0, 0
    for p, var in flat:
        name = _wan_name(p)
        if name is None:
            fresh_paths.append(p)
            continue
        shape = tuple(var.shape)
        if p[0] == "blocks":
            value = np.empty(shape, np.float32)       # filled layer by layer, in place
            for i in range(cfg.num_layers):
                key = name.format(i=i)
                dtypes[ckpt.dtype(key)] += 1
                value[i] = _to_ours(p, np.asarray(ckpt.get(key)), cfg)
                tensors += 1
        else:
            dtypes[ckpt.dtype(name)] += 1
            value = _to_ours(p, np.asarray(ckpt.get(name)), cfg).astype(np.float32)
            tensors += 1
        wan_params += value.size
        loaded.append((p, var.replace(value=jnp.asarray(value))))
        del value

    fresh = _fresh_values(cfg, fresh_paths, seed)
    for p, var in flat:
        if p in fresh:
            loaded.append((p, var.replace(value=fresh[p])))
    nnx.update(abstract, nnx.from_flat_state(loaded))
    if fresh_paths:
        notes.append("not in the checkpoint, freshly initialised (seed "
                     f"{seed}): " + ", ".join(".".join(map(str, p)) for p in fresh_paths))
    report = ImportReport(source=ckpt.source, tensors=tensors, parameters=int(wan_params),
                          source_dtypes=dict(dtypes), notes=tuple(notes))
    return abstract, report
