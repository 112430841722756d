"""Files for people to look at: mp4 (H.264 + AAC) with sound, and PNG contact sheets.

Both writers go through a temporary name and rename at the end, so an interrupted run never
leaves a half-written file under the final name. The PNG encoder is a few lines of zlib, which
keeps the package free of an imaging dependency.
"""

from __future__ import annotations

import os
import struct
import zlib
from typing import Sequence

import numpy as np

from avatarv_jax.data.avatarworld import speech


def _temp_path(path: str) -> str:
    root, ext = os.path.splitext(path)
    return f"{root}.partial-{os.getpid()}{ext}"


def encode_png(image: np.ndarray) -> bytes:
    """PNG bytes of a uint8 [H, W, 3] image."""
    image = np.ascontiguousarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    h, w, _ = image.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), image.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
            + chunk(b"IEND", b""))


def write_png(path: str, image: np.ndarray) -> None:
    data = encode_png(image)
    tmp = _temp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def contact_sheet(rows: Sequence[Sequence[np.ndarray]], gap: int = 2) -> np.ndarray:
    """Tile equally sized uint8 frames into a grid with white gaps (rows of columns)."""
    if not rows or not rows[0]:
        raise ValueError("a contact sheet needs at least one frame")
    h, w, _ = rows[0][0].shape
    ncol = max(len(r) for r in rows)
    sheet = np.full((len(rows) * (h + gap) + gap, ncol * (w + gap) + gap, 3), 255, np.uint8)
    for i, row in enumerate(rows):
        for j, frame in enumerate(row):
            if frame.shape != (h, w, 3):
                raise ValueError(f"frame shape {frame.shape} differs from {(h, w, 3)}")
            y, x = gap + i * (h + gap), gap + j * (w + gap)
            sheet[y:y + h, x:x + w] = frame
    return sheet


def write_mp4(path: str, frames: np.ndarray, audio: np.ndarray | None = None,
              fps: int = speech.FPS, sample_rate: int = speech.SAMPLE_RATE, crf: int = 18) -> None:
    """H.264 (yuv420p) video with optional AAC mono sound, via PyAV."""
    try:
        import av
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("writing mp4 needs PyAV (pip install av)") from e
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T, H, W, 3], got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"H.264 with yuv420p needs even sizes, got {frames.shape[1:3]}")
    tmp = _temp_path(path)
    try:
        with av.open(tmp, mode="w", format="mp4") as container:
            vs = container.add_stream("libx264", rate=fps)
            vs.width, vs.height = frames.shape[2], frames.shape[1]
            vs.pix_fmt = "yuv420p"
            vs.options = {"crf": str(crf), "preset": "veryfast"}
            as_ = None
            if audio is not None:
                as_ = container.add_stream("aac", rate=sample_rate)
                as_.layout = "mono"
            for frame in frames:
                for packet in vs.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in vs.encode():
                container.mux(packet)
            if as_ is not None:
                pcm = np.clip(np.asarray(audio, np.float32), -1, 1)[None, :]
                block = 1024
                for start in range(0, pcm.shape[1], block):
                    af = av.AudioFrame.from_ndarray(np.ascontiguousarray(pcm[:, start:start + block]),
                                                    format="fltp", layout="mono")
                    af.sample_rate = sample_rate
                    af.pts = start
                    for packet in as_.encode(af):
                        container.mux(packet)
                for packet in as_.encode():
                    container.mux(packet)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
