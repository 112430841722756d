"""Import the Wan 2.1 VAE from diffusers' ``AutoencoderKLWan`` safetensors into ``CausalVideoVAE``.

Our module tree uses diffusers' attribute names, so a parameter's checkpoint name is its
path with two renames (``docs/weights.md``): ``kernel`` -> ``weight`` (transposed from
PyTorch's out-channels-first layout) and ``resample`` -> ``resample.1`` (diffusers wraps that
conv in a ``Sequential`` after a padding/upsampling layer). Norm ``gamma`` s lose their
broadcast axes. Everything is checked against the full expected table before any tensor is
converted, so a wrong file or config fails once, listing every offending key.

The original ``Wan2.1_VAE.pth`` is a pickle and is not read; use the diffusers release
(``Wan-AI/Wan2.1-T2V-14B-Diffusers``, folder ``vae/``), which ships safetensors.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path
from typing import Any
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from avatarv_jax.io.import_report import (ImportReport, check_config_agrees,
                                          check_names_and_shapes)
from avatarv_jax.io.safetensors_io import (SafetensorsCheckpoint, UnsupportedCheckpointError,
                                           locate_checkpoint)
from avatarv_jax.models.vae import CausalVideoVAE, VAEConfig

WAN_PTH_HINT = ("The original Wan2.1_VAE.pth is a pickle; use the diffusers release instead "
                "(Wan-AI/Wan2.1-T2V-14B-Diffusers, folder vae/: config.json + "
                "diffusion_pytorch_model.safetensors).")
ORIGINAL_LAYOUT_HINT = (
    "These keys use the original Wan layout (encoder.downsamples..., decoder.upsamples...), "
    "not diffusers' names. Convert once with diffusers: "
    "AutoencoderKLWan.from_single_file(path).save_pretrained(out_dir), then import out_dir.")

# diffusers' AutoencoderKLWan defaults, for config.json files that omit a key.
_DIFFUSERS_DEFAULTS = dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                           attn_scales=[], temperal_downsample=[False, True, True],
                           is_residual=False, in_channels=3, out_channels=3, patch_size=None,
                           decoder_base_dim=None)


def config_from_diffusers(config: Mapping[str, Any], **overrides) -> VAEConfig:
    """A ``VAEConfig`` from an ``AutoencoderKLWan`` ``config.json`` dict.

    Raises for Wan 2.2-style options this model does not implement.
    """
    c = {**_DIFFUSERS_DEFAULTS, **config}
    cls = c.get("_class_name", "AutoencoderKLWan")
    problems = []
    if cls != "AutoencoderKLWan":
        problems.append(f"_class_name is {cls!r}, expected 'AutoencoderKLWan'")
    if c["is_residual"]:
        problems.append("is_residual=True (the Wan 2.2 VAE) is not supported")
    if c["patch_size"] not in (None, 1):
        problems.append(f"patch_size={c['patch_size']} (the Wan 2.2 VAE) is not supported")
    if c["attn_scales"]:
        problems.append(f"attn_scales={c['attn_scales']} is not supported (Wan 2.1 has none)")
    if c["decoder_base_dim"] not in (None, c["base_dim"]):
        problems.append(f"decoder_base_dim={c['decoder_base_dim']} differs from base_dim")
    if c["in_channels"] != c["out_channels"]:
        problems.append(f"in_channels={c['in_channels']} differs from "
                        f"out_channels={c['out_channels']}")
    if problems:
        raise ValueError("unsupported AutoencoderKLWan config: " + "; ".join(problems))
    fields = dict(base_dim=c["base_dim"], z_dim=c["z_dim"], dim_mult=tuple(c["dim_mult"]),
                  num_res_blocks=c["num_res_blocks"],
                  temporal_downsample=tuple(c["temperal_downsample"]),
                  in_channels=c["in_channels"])
    for key in ("latents_mean", "latents_std"):
        if c.get(key) is not None:
            fields[key] = tuple(c[key])
    return VAEConfig(**{**fields, **overrides})


def diffusers_name(path: tuple) -> str:
    """Our parameter path -> its ``AutoencoderKLWan`` state-dict key."""
    parts = ["resample.1" if p == "resample" else str(p) for p in path]
    if parts[-1] == "kernel":
        parts[-1] = "weight"
    return ".".join(parts)


def _torch_shape(path: tuple, shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == "gamma":  # attention norms broadcast over (H, W), the others over (T, H, W)
        return (shape[0], 1, 1) if "attentions" in path else (shape[0], 1, 1, 1)
    if path[-1] == "kernel":
        if len(shape) == 5:
            return (shape[4], shape[3], *shape[:3])
        if len(shape) == 4:
            return (shape[3], shape[2], *shape[:2])
        if len(shape) == 2:  # attention 1x1 Conv2d
            return (shape[1], shape[0], 1, 1)
    return tuple(shape)


def _to_ours(path: tuple, w: np.ndarray) -> np.ndarray:
    if path[-1] == "gamma":
        return w.reshape(-1)
    if path[-1] == "kernel":
        if w.ndim == 5:
            return w.transpose(2, 3, 4, 1, 0)
        if w.ndim == 4 and w.shape[2:] == (1, 1) and "attentions" in path:
            return w[:, :, 0, 0].T
        if w.ndim == 4:
            return w.transpose(2, 3, 1, 0)
    return w


def _abstract_params(cfg: VAEConfig):
    abstract = nnx.eval_shape(lambda: CausalVideoVAE(cfg, rngs=nnx.Rngs(0)))
    return abstract, list(nnx.to_flat_state(nnx.state(abstract, nnx.Param)))


def expected_shapes(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    """Every ``AutoencoderKLWan`` key this config needs, with its PyTorch shape."""
    return {diffusers_name(p): _torch_shape(p, tuple(v.shape)) for p, v in _abstract_params(cfg)[1]}



def import_wan_vae(path_or_dir: str | Path, cfg: VAEConfig | None = None, *,
                   dtype=None) -> tuple[CausalVideoVAE, ImportReport]:
    """Load diffusers ``AutoencoderKLWan`` weights into a new ``CausalVideoVAE``.

    ``path_or_dir``: a diffusers VAE folder (``config.json`` + safetensors), a pipeline
    root with a ``vae/`` folder, a ``.safetensors`` file or a sharded index. ``cfg``
    defaults to the one read from ``config.json``; when both exist they must agree.
    ``dtype`` overrides the compute dtype (parameters are always fp32).
    """
    path = Path(path_or_dir)
    if not path.exists():
        raise FileNotFoundError(f"no Wan VAE checkpoint at {path}")
    path, config_file = locate_checkpoint(path, "vae")
    notes = []
    if config_file is not None:
        file_cfg = config_from_diffusers(json.loads(config_file.read_text()),
                                         dtype=(cfg.dtype if cfg is not None else jnp.float32))
        if cfg is None:
            cfg = file_cfg
            notes.append(f"config read from {config_file}")
        else:
            check_config_agrees(cfg, {f.name: getattr(file_cfg, f.name)
                                      for f in dataclasses.fields(cfg)},
                                config_file, "import_wan_vae")
    elif cfg is None:
        raise ValueError(f"no config.json next to {path}: pass cfg (e.g. VAEConfig.wan21())")
    if dtype is not None:
        cfg = dataclasses.replace(cfg, dtype=dtype)

    try:
        ckpt = SafetensorsCheckpoint(path)
    except UnsupportedCheckpointError as e:
        raise UnsupportedCheckpointError(f"{e}\n{WAN_PTH_HINT}") from None

    abstract, flat = _abstract_params(cfg)
    expected = {diffusers_name(p): _torch_shape(p, tuple(v.shape)) for p, v in flat}
    found = ckpt.shapes()
    original_layout = any(k.startswith(("encoder.downsamples.", "decoder.upsamples."))
                          for k in found)
    check_names_and_shapes(expected, found, source=ckpt.source,
                           hint=ORIGINAL_LAYOUT_HINT if original_layout else "")

    dtypes = collections.Counter()
    loaded = []
    for p, var in flat:
        name = diffusers_name(p)
        dtypes[ckpt.dtype(name)] += 1
        value = _to_ours(p, np.asarray(ckpt.get(name))).astype(np.float32)
        loaded.append((p, var.replace(value=jnp.asarray(value))))
    nnx.update(abstract, nnx.from_flat_state(loaded))
    report = ImportReport(source=ckpt.source, tensors=len(loaded),
                          parameters=int(sum(np.prod(v.shape) for _, v in flat)),
                          source_dtypes=dict(dtypes), notes=tuple(notes))
    return abstract, report
