"""Import the umT5 text encoder (transformers ``UMT5EncoderModel`` safetensors) into ``T5Encoder``.

Wan 2.1's diffusers release ships the umT5-XXL encoder in ``text_encoder/`` (``config.json`` +
sharded safetensors) and its SentencePiece tokenizer in ``tokenizer/`` (``spiece.model``).
The name table is ``models.text_encoder.hf_umt5_names``: per-layer tensors
``encoder.block.{i}.…`` are stacked on our leading ``layers`` axis, and PyTorch ``Linear``
weights ``[out, in]`` become ``Dense`` kernels ``[in, out]``.

A full encoder-decoder checkpoint (``UMT5ForConditionalGeneration`` / ``T5ForConditionalGeneration``)
is accepted too: its ``decoder.*`` and ``lm_head.*`` tensors are skipped and listed in the report.
Classic T5 / mT5 checkpoints (``model_type`` ``t5`` / ``mt5``) share one relative position bias
learned in layer 0, which ``TextEncoderConfig.position_bias_per_layer=False`` reproduces.
Every name and shape is checked before anything is converted, so a wrong file or config fails
once, listing every offending key.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import nnx

from avatarv_jax.io.import_report import (ImportReport, check_config_agrees,
                                          check_names_and_shapes)
from avatarv_jax.io.safetensors_io import SafetensorsCheckpoint, locate_checkpoint
from avatarv_jax.models.text_encoder import T5Encoder, TextEncoderConfig, hf_umt5_names
from avatarv_jax.models.tokenizer import SentencePieceTokenizer

# transformers' T5Config defaults, for config.json files that omit a key.
_HF_DEFAULTS = {"vocab_size": 32128, "d_model": 512, "d_kv": 64, "d_ff": 2048, "num_layers": 6,
                "num_heads": 8, "relative_attention_num_buckets": 32,
                "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
                "feed_forward_proj": "relu", "model_type": "t5"}
# model_type -> position_bias_per_layer: umT5 learns a bias in every layer, T5 / mT5 in layer 0.
_MODEL_TYPES = {"umt5": True, "t5": False, "mt5": False}
# Keys of a full encoder-decoder checkpoint that the encoder does not use.
_SKIPPED_PREFIXES = ("decoder.", "lm_head.")
_EMBED_ALIAS = "encoder.embed_tokens.weight"   # tied to shared.weight


def config_from_transformers(config: Mapping[str, Any], **overrides) -> TextEncoderConfig:
    """A ``TextEncoderConfig`` from a transformers T5-family ``config.json`` dict.

    Only the gated-GELU feed-forward (T5 v1.1 / mT5 / umT5) is implemented; other
    ``feed_forward_proj`` values are refused. ``overrides`` set ``dtype``, ``remat``...
    """
    c = {**_HF_DEFAULTS, **config}
    problems = []
    model_type = c["model_type"]
    if model_type not in _MODEL_TYPES:
        problems.append(f"model_type is {model_type!r}, expected one of {sorted(_MODEL_TYPES)}")
    if c["feed_forward_proj"] != "gated-gelu":
        problems.append(f"feed_forward_proj={c['feed_forward_proj']!r} is not supported (only "
                        f"'gated-gelu', the T5 v1.1 / umT5 feed-forward)")
    if c.get("dense_act_fn", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"dense_act_fn={c['dense_act_fn']!r} is not supported (tanh GELU only)")
    if problems:
        raise ValueError("unsupported T5 config: " + "; ".join(problems))
    fields = {"vocab_size": c["vocab_size"], "d_model": c["d_model"], "d_kv": c["d_kv"],
              "num_heads": c["num_heads"], "d_ff": c["d_ff"], "num_layers": c["num_layers"],
              "num_buckets": c["relative_attention_num_buckets"],
              "max_distance": c["relative_attention_max_distance"],
              "position_bias_per_layer": _MODEL_TYPES[model_type],
              "eps": float(c["layer_norm_epsilon"])}
    return TextEncoderConfig(**{**fields, **overrides})


def _abstract(cfg: TextEncoderConfig):
    abstract = nnx.eval_shape(lambda: T5Encoder(cfg, nnx.Rngs(0)))
    return abstract, list(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))


def _mapped(cfg: TextEncoderConfig, flat) -> list[tuple[tuple, Any, str, bool]]:
    """``(path, variable, hf_name, transpose)`` for every parameter of the abstract model."""
    names = hf_umt5_names(cfg)
    out, unmapped = [], []
    for p, var in flat:
        key = ".".join(map(str, p))
        if key not in names:
            unmapped.append(key)
            continue
        out.append((p, var, *names[key]))
    if unmapped:  # a model change that hf_umt5_names does not know about yet
        raise RuntimeError(f"hf_umt5_names has no checkpoint name for: {', '.join(unmapped)}")
    return out


def _torch_shape(path: tuple, shape: tuple[int, ...], transpose: bool) -> tuple[int, ...]:
    if path[0] == "layers":
        shape = shape[1:]
    return tuple(reversed(shape)) if transpose else tuple(shape)


def expected_shapes(cfg: TextEncoderConfig) -> dict[str, tuple[int, ...]]:
    """Every ``UMT5EncoderModel`` key this config needs, with its PyTorch shape."""
    out = {}
    for p, var, name, transpose in _mapped(cfg, _abstract(cfg)[1]):
        shape = _torch_shape(p, tuple(var.shape), transpose)
        if p[0] == "layers":
            out.update({name.format(i=i): shape for i in range(cfg.num_layers)})
        else:
            out[name] = shape
    return out



def import_umt5(path: str | Path, cfg: TextEncoderConfig | None = None, *,
                dtype=None) -> tuple[T5Encoder, ImportReport]:
    """Load transformers umT5 / T5 encoder weights into a new ``T5Encoder``.

    ``path``: a ``UMT5EncoderModel`` folder (``config.json`` + safetensors), a pipeline root
    with a ``text_encoder/`` folder, a ``.safetensors`` file or a sharded index. ``cfg``
    defaults to the one read from ``config.json``; when both exist their sizes must agree.
    ``dtype`` overrides the compute dtype (parameters are always fp32).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no umT5 checkpoint at {path}")
    path, config_file = locate_checkpoint(path, "text_encoder")
    notes = []
    if config_file is not None:
        file_cfg = config_from_transformers(json.loads(config_file.read_text()))
        if cfg is None:
            cfg = file_cfg
            notes.append(f"config read from {config_file}")
        else:
            ignore = ("dtype", "remat")  # run-time choices, not sizes
            check_config_agrees(cfg, {f.name: getattr(file_cfg, f.name)
                                      for f in dataclasses.fields(cfg) if f.name not in ignore},
                                config_file, "import_umt5")
            notes.append(f"config checked against {config_file}")
    elif cfg is None:
        raise ValueError(f"no config.json next to {path}: pass cfg "
                         f"(e.g. TextEncoderConfig.umt5_xxl())")
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)

    ckpt = SafetensorsCheckpoint(path)
    found = ckpt.shapes()
    # Tied embeddings are saved once, as either name; read whichever is there.
    embed_key = "shared.weight"
    if embed_key not in found and _EMBED_ALIAS in found:
        embed_key = _EMBED_ALIAS
        found["shared.weight"] = found.pop(_EMBED_ALIAS)
    skipped = sorted(k for k in found if k.startswith(_SKIPPED_PREFIXES))
    ignore = set(skipped) | ({_EMBED_ALIAS} if _EMBED_ALIAS in found else set())
    abstract, flat = _abstract(cfg)
    mapped = _mapped(cfg, flat)
    check_names_and_shapes(expected_shapes(cfg), found, source=ckpt.source, ignore=ignore)

    dtypes = collections.Counter()
    loaded, tensors = [], 0
    for p, var, name, transpose in mapped:
        if p[0] == "layers":
            value = np.empty(var.shape, np.float32)       # filled layer by layer, in place
            for i in range(cfg.num_layers):
                key = name.format(i=i)
                w = np.asarray(ckpt.get(key))
                dtypes[ckpt.dtype(key)] += 1
                value[i] = w.T if transpose else w
                tensors += 1
        else:
            key = embed_key if name == "shared.weight" else name
            w = np.asarray(ckpt.get(key))
            dtypes[ckpt.dtype(key)] += 1
            value = (w.T if transpose else w).astype(np.float32)
            tensors += 1
        loaded.append((p, var.replace(value=jnp.asarray(value))))
        del value
    nnx.update(abstract, nnx.from_flat_state(loaded))
    if skipped:
        notes.append(f"skipped {len(skipped)} decoder / lm_head tensors of an encoder-decoder "
                     f"checkpoint: " + ", ".join(skipped[:8])
                     + (f" and {len(skipped) - 8} more" if len(skipped) > 8 else ""))
    report = ImportReport(source=ckpt.source, tensors=tensors,
                          parameters=int(sum(np.prod(v.shape) for _, v in flat)),
                          source_dtypes=dict(dtypes), notes=tuple(notes))
    return abstract, report


def load_umt5_tokenizer(directory: str | Path) -> SentencePieceTokenizer:
    """The SentencePiece tokenizer in ``directory`` (a ``tokenizer/`` folder holding
    ``spiece.model``, or a pipeline root with one)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"no tokenizer directory at {directory}")
    for candidate in (directory / "spiece.model", directory / "tokenizer" / "spiece.model"):
        if candidate.is_file():
            return SentencePieceTokenizer(candidate)
    present = sorted(p.name for p in directory.iterdir())[:20]
    raise FileNotFoundError(
        f"no spiece.model in {directory} (or {directory / 'tokenizer'}); found: "
        f"{', '.join(present) or 'nothing'}. The umT5 tokenizer is the SentencePiece model in "
        f"the tokenizer/ folder of the Wan 2.1 diffusers release; a tokenizer.json-only "
        f"(fast tokenizer) folder is not supported.")
