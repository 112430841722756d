"""Small NNX models (the AvatarWorld probe, the AvatarWorld SyncNet) as safetensors assets.

Both ship their weights in the package, named by parameter path, with their constructor config
and a training record as metadata. One writer (temporary name, then rename) and one checked
loader keep the two formats identical.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def param_key(path) -> str:
    """``'trunk.layers.0.kernel'`` for a key path of an NNX state."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def flatten_params(model: nnx.Module) -> dict[str, np.ndarray]:
    """Every ``nnx.Param`` of ``model`` by its dotted path."""
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    return {param_key(p): np.asarray(v) for p, v in leaves}


def load_params(model: nnx.Module, tensors: dict[str, np.ndarray], source: str) -> nnx.Module:
    """Copy named arrays into ``model`` (fp32); a missing, unexpected or misshapen name is an error."""
    expected = flatten_params(model)
    if set(expected) != set(tensors):
        raise ValueError(f"{source} does not match {type(model).__name__}: missing "
                         f"{sorted(set(expected) - set(tensors))[:5]}, unexpected "
                         f"{sorted(set(tensors) - set(expected))[:5]}")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))
    new = []
    for p, leaf in leaves:
        value = np.asarray(tensors[param_key(p)])
        if value.shape != leaf.shape:
            raise ValueError(f"{source}: {param_key(p)} has shape {value.shape}, "
                             f"expected {leaf.shape}")
        new.append(jnp.asarray(value, jnp.float32))
    nnx.update(model, jax.tree_util.tree_unflatten(treedef, new))
    return model


def save_weights(model: nnx.Module, path: str, config: str, meta: dict[str, Any] | None = None,
                 dtype=np.float16) -> None:
    """Safetensors of the parameters (``dtype``), ``config`` (JSON text) and ``meta`` as metadata."""
    from safetensors.numpy import save_file

    tensors = {k: v.astype(dtype) for k, v in flatten_params(model).items()}
    tmp = f"{path}.partial-{os.getpid()}"
    try:
        save_file(tensors, tmp, metadata={"config": config, "meta": json.dumps(meta or {})})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def read_weights(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The named arrays and the metadata of a safetensors file (no code can run).

    A file that is not safetensors raises ``ValueError`` naming it (safetensors' own error
    type is not a ``ValueError``, so callers could not report it as bad input).
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
