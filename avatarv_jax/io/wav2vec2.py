"""Import transformers ``Wav2Vec2Model`` weights into our ``Wav2Vec2Encoder``.

Names, as ``ours <- transformers`` (``T``: a torch ``Linear`` ``(out, in)`` weight transposed to
our ``(in, out)`` kernel; ``C``: a torch ``Conv1d`` ``(out, in, width)`` weight transposed
``(2, 1, 0)`` to our ``(width, in, out)`` kernel; ``{i}`` stacks along our ``layers`` axis;
``E = encoder.layers.{i}``)::

    feature_extractor.{j}.kernel      <- feature_extractor.conv_layers.{j}.conv.weight   C
    feature_extractor.{j}.bias        <- feature_extractor.conv_layers.{j}.conv.bias  (conv_bias)
    feature_extractor.{j}.norm.scale  <- feature_extractor.conv_layers.{j}.layer_norm.weight
    feature_extractor.{j}.norm.bias   <- feature_extractor.conv_layers.{j}.layer_norm.bias
    feature_projection.layer_norm     <- feature_projection.layer_norm.{weight,bias}
    feature_projection.projection     <- feature_projection.projection.{weight T, bias}
    pos_conv.kernel                   <- encoder.pos_conv_embed.conv.{weight_g, weight_v}  C
                                         (or .parametrizations.weight.{original0, original1})
    pos_conv.bias                     <- encoder.pos_conv_embed.conv.bias
    encoder_norm                      <- encoder.layer_norm.{weight,bias}
    layers.attention.{q,k,v,out}_proj <- E.attention.{q,k,v,out}_proj.{weight T, bias}
    layers.layer_norm                 <- E.layer_norm.{weight,bias}
    layers.intermediate_dense         <- E.feed_forward.intermediate_dense.{weight T, bias}
    layers.output_dense               <- E.feed_forward.output_dense.{weight T, bias}
    layers.final_layer_norm           <- E.final_layer_norm.{weight,bias}

(LayerNorm ``scale`` <- ``weight``.) The positional convolution is stored weight-normalised
(``dim=2``): ``weight = g * v / ||v||`` with the norm over the output and input-channel axes for
each kernel tap; older checkpoints name the two tensors ``weight_g`` / ``weight_v``, newer
PyTorch saves ``parametrizations.weight.original0`` / ``original1``. Both are folded into one
plain kernel here (a plain ``conv.weight`` is accepted too).

Checkpoints of the task models (``Wav2Vec2ForCTC``, ``Wav2Vec2ForPreTraining``, ...) prefix the
encoder with ``wav2vec2.``; their heads (``lm_head``, ``quantizer``, ``project_hid``,
``project_q``) and the training-only ``masked_spec_embed`` are skipped and listed in the report.
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
from avatarv_jax.models.wav2vec2 import Wav2Vec2Config, Wav2Vec2Encoder

Path_ = tuple

PREFIX = "wav2vec2."
POS = "encoder.pos_conv_embed.conv"
# (magnitude g, direction v) key pairs of the weight-normalised positional conv, by style.
WEIGHT_NORM_STYLES = {
    "weight_g/weight_v": (f"{POS}.weight_g", f"{POS}.weight_v"),
    "parametrizations": (f"{POS}.parametrizations.weight.original0",
                         f"{POS}.parametrizations.weight.original1"),
}
# Keys (after the ``wav2vec2.`` prefix is removed) that are not part of the encoder.
_SKIP_PREFIXES = ("lm_head.", "quantizer.", "project_hid.", "project_q.", "masked_spec_embed")

# transformers' Wav2Vec2Config defaults for the fields we use (config.json omits defaults).
_HF_DEFAULTS = {
    "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "conv_dim": [512] * 7, "conv_kernel": [10, 3, 3, 3, 3, 2, 2],
    "conv_stride": [5, 2, 2, 2, 2, 2, 2], "conv_bias": False, "feat_extract_norm": "group",
    "do_stable_layer_norm": False, "num_conv_pos_embeddings": 128,
    "num_conv_pos_embedding_groups": 16, "layer_norm_eps": 1e-5, "hidden_act": "gelu",
    "feat_extract_activation": "gelu", "add_adapter": False, "model_type": "wav2vec2"}
_CONFIG_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "conv_dim", "conv_kernel", "conv_stride", "conv_bias", "feat_extract_norm",
                  "do_stable_layer_norm", "num_conv_pos_embeddings",
                  "num_conv_pos_embedding_groups", "layer_norm_eps")


def config_from_transformers(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``Wav2Vec2Config`` fields a transformers ``config.json`` fixes.

    Raises for options the encoder does not implement (adapters, other activations, other
    model types such as HuBERT or wav2vec2-conformer, whose weights differ).
    """
    c = {**_HF_DEFAULTS, **config}
    problems = []
    if c["model_type"] != "wav2vec2":
        problems.append(f"model_type is {c['model_type']!r}, expected 'wav2vec2'")
    if c["add_adapter"]:
        problems.append("add_adapter=True (the adapter stack) is not supported")
    for key in ("hidden_act", "feat_extract_activation"):
        if c[key] != "gelu":
            problems.append(f"{key}={c[key]!r} (only exact 'gelu')")
    if c.get("position_embeddings_type") not in (None, "conv"):
        problems.append(f"position_embeddings_type={c['position_embeddings_type']!r}")
    if problems:
        raise ValueError("unsupported Wav2Vec2 config: " + "; ".join(problems))
    out = {k: c[k] for k in _CONFIG_FIELDS}
    for k in ("conv_dim", "conv_kernel", "conv_stride"):
        out[k] = tuple(int(v) for v in out[k])
    out["layer_norm_eps"] = float(out["layer_norm_eps"])
    return out


def _hf_name(path: Path_) -> str:
    """transformers key (without prefix, ``{i}`` for the layer) of our parameter ``path``."""
    leaf = {"kernel": "weight", "scale": "weight", "bias": "bias"}[path[-1]]
    head = path[0]
    if head == "feature_extractor":
        j = path[1]
        if path[2] == "norm":
            return f"feature_extractor.conv_layers.{j}.layer_norm.{leaf}"
        return f"feature_extractor.conv_layers.{j}.conv.{leaf}"
    if head == "feature_projection":
        return f"feature_projection.{path[1]}.{leaf}"
    if head == "pos_conv":
        return f"{POS}.{leaf}"
    if head == "encoder_norm":
        return f"encoder.layer_norm.{leaf}"
    if head == "layers":
        mid = ".".join(map(str, path[1:-1]))
        if path[1] in ("intermediate_dense", "output_dense"):
            mid = f"feed_forward.{mid}"
        return f"encoder.layers.{{i}}.{mid}.{leaf}"
    raise KeyError(f"no transformers name for {path}")


def _torch_shape(path: Path_, shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] != "kernel":
        return tuple(shape)
    if len(shape) == 3:                       # conv (width, in, out) <- (out, in, width)
        return (shape[2], shape[1], shape[0])
    return (shape[1], shape[0])               # Dense (in, out) <- (out, in)


def _to_ours(path: Path_, w: np.ndarray) -> np.ndarray:
    if path[-1] != "kernel":
        return w
    return w.transpose(2, 1, 0) if w.ndim == 3 else w.T


def fold_weight_norm(g: np.ndarray, v: np.ndarray) -> np.ndarray:
    """``g * v / ||v||`` for PyTorch ``weight_norm(dim=2)``: one norm per kernel tap (fp64)."""
    v = np.asarray(v, np.float64)
    norm = np.sqrt(np.sum(v * v, axis=(0, 1), keepdims=True))
    return np.asarray(g, np.float64) * v / norm


def _abstract(cfg: Wav2Vec2Config):
    abstract = nnx.eval_shape(lambda: Wav2Vec2Encoder(cfg, rngs=nnx.Rngs(0)))
    return abstract, list(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))


def _pos_style(keys) -> str:
    """Which form the positional conv weight takes in a checkpoint's (unprefixed) ``keys``."""
    for style, (g, v) in WEIGHT_NORM_STYLES.items():
        if g in keys or v in keys:
            return style
    return "plain" if f"{POS}.weight" in keys else "weight_g/weight_v"


def expected_shapes(cfg: Wav2Vec2Config,
                    pos_style: str = "weight_g/weight_v") -> dict[str, tuple[int, ...]]:
    """Every ``Wav2Vec2Model`` key (no prefix) this config needs, with its PyTorch shape."""
    out = {}
    for p, var in _abstract(cfg)[1]:
        shape = tuple(var.shape)
        if p == ("pos_conv", "kernel"):
            k, per_group, h = shape
            if pos_style == "plain":
                out[f"{POS}.weight"] = (h, per_group, k)
            else:
                g, v = WEIGHT_NORM_STYLES[pos_style]
                out[g], out[v] = (1, 1, k), (h, per_group, k)
            continue
        name = _hf_name(p)
        if p[0] == "layers":
            for i in range(cfg.num_hidden_layers):
                out[name.format(i=i)] = _torch_shape(p, shape[1:])
        else:
            out[name] = _torch_shape(p, shape)
    return out



def _resolve_config(cfg: Wav2Vec2Config | None, config_file: Path | None,
                    dtype) -> tuple[Wav2Vec2Config, list[str]]:
    notes = []
    if config_file is None:
        if cfg is None:
            raise ValueError("no config.json next to the checkpoint: pass cfg (e.g. "
                             "Wav2Vec2Config.base() or Wav2Vec2Config.large())")
    else:
        hf = config_from_transformers(json.loads(config_file.read_text()))
        if cfg is None:
            cfg = Wav2Vec2Config(**hf)
        else:
            check_config_agrees(cfg, hf, config_file, "import_wav2vec2")
        notes.append(f"config from {config_file}")
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)
    return cfg, notes


def import_wav2vec2(path: str | Path, cfg: Wav2Vec2Config | None = None, *,
                    dtype=None) -> tuple[Wav2Vec2Encoder, ImportReport]:
    """Load a transformers wav2vec 2.0 checkpoint into a new ``Wav2Vec2Encoder``.

    ``path``: a ``save_pretrained`` folder (``config.json`` + safetensors), a ``.safetensors``
    file or a sharded index. The config comes from ``config.json`` when there is one (a ``cfg``
    passed as well must agree with it); a bare file needs ``cfg``. ``dtype`` overrides the
    compute dtype; parameters are always fp32.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no wav2vec2 checkpoint at {path}")
    path, config_file = locate_checkpoint(path)
    cfg, notes = _resolve_config(cfg, config_file, dtype)

    ckpt = SafetensorsCheckpoint(path)
    raw = ckpt.shapes()
    prefixed = any(k.startswith(PREFIX) for k in raw)
    found, source_key, skipped = {}, {}, []
    for key, shape in raw.items():
        name = key[len(PREFIX):] if prefixed and key.startswith(PREFIX) else key
        if name.startswith(_SKIP_PREFIXES):
            skipped.append(key)
            continue
        if name in found:   # both "x" and "wav2vec2.x": which one is meant is unclear
            raise ValueError(f"{ckpt.source} holds both {key!r} and {source_key[name]!r}, "
                             f"which both stand for {name!r}")
        found[name] = shape
        source_key[name] = key

    style = _pos_style(found)
    abstract, flat = _abstract(cfg)
    check_names_and_shapes(
        expected_shapes(cfg, style), found, source=ckpt.source,
        hint=(f"  (config: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
              f"feat_extract_norm={cfg.feat_extract_norm!r}, "
              f"do_stable_layer_norm={cfg.do_stable_layer_norm}, conv_bias={cfg.conv_bias})"))

    dtypes = collections.Counter()

    def read(name: str) -> np.ndarray:
        dtypes[ckpt.dtype(source_key[name])] += 1
        return np.asarray(ckpt.get(source_key[name]), np.float32)

    loaded, tensors, params = [], 0, 0
    for p, var in flat:
        shape = tuple(var.shape)
        if p == ("pos_conv", "kernel"):
            if style == "plain":
                w, tensors = read(f"{POS}.weight"), tensors + 1
            else:
                g, v = WEIGHT_NORM_STYLES[style]
                w, tensors = fold_weight_norm(read(g), read(v)), tensors + 2
            value = _to_ours(p, w).astype(np.float32)
        elif p[0] == "layers":
            name = _hf_name(p)
            value = np.empty(shape, np.float32)        # filled layer by layer, in place
            for i in range(cfg.num_hidden_layers):
                value[i] = _to_ours(p, read(name.format(i=i)))
                tensors += 1
        else:
            value = _to_ours(p, read(_hf_name(p))).astype(np.float32)
            tensors += 1
        params += value.size
        loaded.append((p, var.replace(value=jnp.asarray(value))))
        del value
    nnx.update(abstract, nnx.from_flat_state(loaded))

    notes.append(f"positional conv weight: {style}"
                 + (" (weight norm folded into the kernel)" if style != "plain" else ""))
    if prefixed:
        notes.append(f"encoder keys read under the {PREFIX!r} prefix")
    if skipped:
        notes.append("skipped (not part of the encoder): " + ", ".join(sorted(skipped)))
    report = ImportReport(source=ckpt.source, tensors=tensors, parameters=int(params),
                          source_dtypes=dict(dtypes), notes=tuple(notes))
    return abstract, report
