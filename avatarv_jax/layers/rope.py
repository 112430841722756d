"""3D rotary position embedding over (frame, row, column), in the Wan 2.1 layout.

The head dimension is split into a temporal part and two equal spatial parts
(``h = w = 2 * (head_dim // 6)``, ``t = head_dim - h - w``); each part rotates interleaved
pairs ``(x[2i], x[2i+1])`` by ``position * theta^(-2i/part)``. Angles are computed from integer
positions on the fly, so positions may be any integers (REF frames sit at a fixed offset,
motion tokens just off the grid) and never need a table that grows with video length.
"""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    """Sizes of the (frame, row, column) parts of the head dimension."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def rope_angles(positions: np.ndarray, head_dim: int, theta: float = 10000.0) -> np.ndarray:
    """[S, head_dim // 2] rotation angles for integer positions [S, 3] (frame, row, col)."""
    parts = []
    for axis, dim in enumerate(axis_dims(head_dim)):
        inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        parts.append(positions[:, axis:axis + 1].astype(np.float64) * inv_freq[None, :])
    return np.concatenate(parts, axis=-1)


def rope_tables(positions: np.ndarray, head_dim: int, theta: float = 10000.0):
    """(cos, sin) as fp32 arrays [S, head_dim // 2]; positions are static (numpy)."""
    angles = rope_angles(positions, head_dim, theta)
    return jnp.asarray(np.cos(angles), jnp.float32), jnp.asarray(np.sin(angles), jnp.float32)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate interleaved pairs of x [B, S, H, D] by tables [S, D/2]; computed in fp32."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    x1, x2 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def segment_positions(frame_positions: np.ndarray, grid: tuple[int, int],
                      motion_token: bool) -> np.ndarray:
    """[F * tokens_per_frame, 3] positions of a segment laid out frame by frame.

    Each frame holds its ``rows * cols`` video tokens in raster order, then (if present) one
    motion token placed just off the grid at row = col = -1.
    """
    rows, cols = grid
    r, c = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    spatial = np.stack([r.ravel(), c.ravel()], axis=-1)
    if motion_token:
        spatial = np.concatenate([spatial, np.array([[-1, -1]])], axis=0)
    per_frame = [np.concatenate([np.full((len(spatial), 1), f), spatial], axis=-1)
                 for f in np.asarray(frame_positions)]
    return np.concatenate(per_frame, axis=0).astype(np.int64)
