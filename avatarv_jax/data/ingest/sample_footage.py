"""Test footage with a known answer: a still photo filmed by a camera that pans and zooms.

``camera_path`` gives, per frame, the square window of the source image that fills the frame;
``render_path`` films it, and ``map_box`` carries a box from image to frame coordinates, so a
face track on the result can be checked against where the face must be. Used by the ingestion
tests and ``benchmarks/ingest.py`` with ``skimage.data.astronaut()`` (scikit-image is a test
dependency, imported only by the callers).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from avatarv_jax.data.avatarworld import media, speech
from avatarv_jax.data.ingest.config import FPS, SAMPLES_PER_FRAME

# dlib's frontal detector on the full 512 x 512 skimage.data.astronaut(): (x0, y0, x1, y1)
ASTRONAUT_FACE_BOX = (179.0, 83.0, 266.0, 170.0)


def camera_path(num_frames: int, *, center=(222.0, 180.0), sway=(30.0, 12.0),
                side=(320.0, 240.0)) -> np.ndarray:
    """float64 [T, 3] windows (centre x, centre y, side) in image pixels: a sideways sway, a
    slower vertical drift, and a steady zoom in from ``side[0]`` to ``side[1]``."""
    u = np.linspace(0.0, 1.0, num_frames)
    cx = center[0] + sway[0] * np.sin(2 * np.pi * u)
    cy = center[1] + sway[1] * np.sin(np.pi * u)
    return np.stack([cx, cy, side[0] + (side[1] - side[0]) * u], axis=1)


def render_path(image: np.ndarray, path: np.ndarray, size: int) -> np.ndarray:
    """uint8 [T, size, size, 3]: bilinear samples of each window (lightly pre-blurred)."""
    img = ndimage.gaussian_filter(np.asarray(image, np.float32), sigma=(0.7, 0.7, 0))
    grid = (np.arange(size) + 0.5) / size - 0.5
    out = np.empty((len(path), size, size, 3), np.uint8)
    for t, (cx, cy, side) in enumerate(path):
        ys = cy + grid[:, None] * side - 0.5 + 0 * grid[None, :]
        xs = cx + grid[None, :] * side - 0.5 + 0 * grid[:, None]
        for c in range(3):
            out[t, ..., c] = np.clip(ndimage.map_coordinates(img[..., c], [ys, xs], order=1,
                                                             mode="nearest"), 0, 255).round()
    return out


def map_box(box, path: np.ndarray, size: int) -> np.ndarray:
    """float64 [T, 4]: an image-space box (x0, y0, x1, y1) in each frame's pixel coordinates."""
    box = np.asarray(box, np.float64)
    cx, cy, side = path[:, 0:1], path[:, 1:2], path[:, 2:3]
    scale = size / side
    xs = (box[[0, 2]][None] - (cx - side / 2)) * scale
    ys = (box[[1, 3]][None] - (cy - side / 2)) * scale
    return np.concatenate([xs[:, :1], ys[:, :1], xs[:, 1:], ys[:, 1:]], axis=1)


def speech_track(num_frames: int, seed: int = 0) -> np.ndarray:
    """float32 [T * 640] of speech (espeak-ng when installed, else the built-in voice)."""
    rng = np.random.default_rng(seed)
    return speech.make_speech(rng, num_frames * SAMPLES_PER_FRAME, "en", "m3", 50, 160).audio


def write_footage(path: str, frames: np.ndarray, audio: np.ndarray | None,
                  fps: int = FPS) -> None:
    """H.264 + AAC mp4 (AvatarWorld's writer: temporary name, then rename)."""
    media.write_mp4(path, frames, audio, fps=fps)


def remux_faststart(src: str, dst: str) -> None:
    """Copy an mp4's packets into one whose index (moov) comes first, as streaming sites serve
    them: a truncated copy of such a file still opens and decodes its first part."""
    import av

    with av.open(src) as inp, av.open(dst, "w", format="mp4",
                                      options={"movflags": "faststart"}) as out:
        streams = {s.index: out.add_stream_from_template(s) for s in inp.streams}
        for packet in inp.demux():
            if packet.dts is None:
                continue
            packet.stream = streams[packet.stream.index]
            out.mux(packet)
