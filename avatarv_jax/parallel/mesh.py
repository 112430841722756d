"""The device mesh: axes ``data``, ``fsdp``, ``tensor``, ``sequence`` (DESIGN §10)."""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
import jax
from jax.sharding import Mesh

MESH_AXES = ("data", "fsdp", "tensor", "sequence")


def make_mesh(shape: Mapping[str, int], devices=None) -> Mesh:
    """A mesh over ``devices`` (default: all) with the four named axes.

    ``shape`` gives each axis's size; one axis may be -1 to take the remaining devices.
    Unlisted axes have size 1.
    """
    devices = list(jax.devices() if devices is None else devices)
    unknown = set(shape) - set(MESH_AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; expected {MESH_AXES}")
    sizes = {a: int(shape.get(a, 1)) for a in MESH_AXES}
    free = [a for a, s in sizes.items() if s == -1]
    if len(free) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {free}")
    known = math.prod(s for s in sizes.values() if s != -1)
    if free:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {dict(shape)}")
        sizes[free[0]] = len(devices) // known
    total = math.prod(sizes.values())
    if total != len(devices):
        raise ValueError(f"mesh {sizes} needs {total} devices, but {len(devices)} are available")
    grid = np.asarray(devices, dtype=object).reshape([sizes[a] for a in MESH_AXES])
    return Mesh(grid, MESH_AXES)
