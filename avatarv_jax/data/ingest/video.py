"""Decode a user's video file into normalised footage: 25 fps RGB frames and 16 kHz mono audio.

PyAV (FFmpeg) does the decoding, the scaling (swscale, area filter) and the audio resampling.
Frame-rate conversion picks, for every output instant ``i / 25`` s, the last source frame shown
at that instant (up to half an output frame early), so a 25 fps source passes through unchanged,
a 50 fps source drops every other frame and a 12 fps source repeats frames (which the "choppy"
filter then sees). The audio is cut to start with the first video frame and to last exactly
``T * 640`` samples. A file whose frames end well before the duration its header declares
(a truncated download whose index sits at the front) is refused like an unreadable one.
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction

import numpy as np

from avatarv_jax.data.ingest.config import (
    FPS,
    SAMPLE_RATE,
    SAMPLES_PER_FRAME,
    IngestConfig,
)

TRUNCATION_TOLERANCE_S = 0.5   # decoding may fall this short (or 5 %) of the declared length


class CorruptVideoError(ValueError):
    """The file cannot be decoded (not a video, truncated, no video stream, no frames)."""


@dataclasses.dataclass(frozen=True)
class Footage:
    frames: np.ndarray        # uint8 [T, H, W, 3] at FPS
    audio: np.ndarray         # float32 [T * SAMPLES_PER_FRAME] at SAMPLE_RATE, mono
    has_audio: bool
    source_fps: float         # the source's average frame rate (0 when unknown)
    source_size: tuple[int, int]  # (height, width) after rotation metadata

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])


def output_size(height: int, width: int, longest_side: int, multiple: int) -> tuple[int, int]:
    """(H, W) with ``max(H, W) == longest_side``, both rounded to a multiple of ``multiple``."""
    if height <= 0 or width <= 0:
        raise ValueError(f"bad frame size {height}x{width}")
    scale = longest_side / max(height, width)

    def round_to(x: int) -> int:
        return max(multiple, round(x * scale / multiple) * multiple)

    return round_to(height), round_to(width)


def _av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("video ingestion needs PyAV (pip install av)") from e
    return av


def _declared_seconds(vstream, container) -> float | None:
    """The video duration the file's header promises (None when it does not say)."""
    if vstream.duration is not None and vstream.time_base is not None:
        return float(vstream.duration * vstream.time_base)
    if container.duration is not None:
        return container.duration / 1e6   # av.time_base: microseconds
    return None


def _rotated(image: np.ndarray, rotation: int) -> np.ndarray:
    """Apply a display-matrix rotation (degrees counter-clockwise, as FFmpeg reports it)."""
    turns = round(rotation / 90.0) % 4
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


def decode(path: str, cfg: IngestConfig) -> Footage:
    """Read ``path`` into normalised footage; raises ``CorruptVideoError`` on unreadable input."""
    av = _av()
    try:
        return _decode(av, path, cfg)
    except CorruptVideoError:
        raise
    except (av.FFmpegError, OSError, EOFError, ValueError, IndexError) as e:
        raise CorruptVideoError(f"{path}: cannot decode: {type(e).__name__}: {e}") from e


def _decode(av, path: str, cfg: IngestConfig) -> Footage:
    with av.open(path, mode="r") as container:
        if not container.streams.video:
            raise CorruptVideoError(f"{path}: no video stream")
        vstream = container.streams.video[0]
        vstream.thread_type = "AUTO"
        astream = container.streams.audio[0] if container.streams.audio else None
        source_fps = float(vstream.average_rate) if vstream.average_rate else 0.0
        declared = _declared_seconds(vstream, container)
        streams = [vstream] + ([astream] if astream is not None else [])

        frames: list[np.ndarray] = []
        audio_chunks: list[np.ndarray] = []
        audio_start: Fraction | None = None
        resampler = (av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
                     if astream is not None else None)
        t0: Fraction | None = None
        last_image: np.ndarray | None = None
        size: tuple[int, int] | None = None
        source_size = (0, 0)
        rotation = 0
        half = Fraction(1, 2 * FPS)
        last_rel = Fraction(0)
        done = False
        limit = Fraction(cfg.max_source_seconds).limit_denominator(1000)

        def emit_until(time: Fraction) -> None:
            # every output instant i/FPS that falls before `time - half` shows last_image
            while last_image is not None and Fraction(len(frames), FPS) + half < time:
                frames.append(last_image)

        for packet in container.demux(*streams):
            if done:
                break
            if packet.stream.type == "audio":
                for aframe in packet.decode():
                    if audio_start is None and aframe.pts is not None:
                        audio_start = aframe.pts * aframe.time_base
                    for out in resampler.resample(aframe):
                        audio_chunks.append(out.to_ndarray().reshape(-1))
                continue
            for vframe in packet.decode():
                if vframe.pts is None:
                    continue
                ts = vframe.pts * vframe.time_base
                if t0 is None:
                    t0 = ts
                rel = ts - t0
                if rel < 0:
                    continue
                if rel >= limit:
                    done = True
                    break
                if size is None:
                    rotation = int(getattr(vframe, "rotation", 0) or 0)
                    h, w = vframe.height, vframe.width
                    if (round(rotation / 90.0)) % 2:
                        h, w = w, h
                    source_size = (h, w)
                    size = output_size(h, w, cfg.longest_side, cfg.size_multiple)
                emit_until(rel)
                ph, pw = (size[1], size[0]) if (round(rotation / 90.0)) % 2 else size
                image = vframe.to_ndarray(width=pw, height=ph, format="rgb24",
                                          interpolation="AREA")
                last_image = _rotated(image, rotation)
                last_rel = rel
        if last_image is None:
            raise CorruptVideoError(f"{path}: no decodable video frame")
        # the last source frame stays on screen for one source frame period
        period = (Fraction(1) / Fraction(source_fps).limit_denominator(1001) if source_fps
                  else Fraction(1, FPS))
        emit_until(min(last_rel + period, limit))
        shown = float(last_rel + period)
        if not done and declared is not None and \
                shown < declared - max(TRUNCATION_TOLERANCE_S, 0.05 * declared):
            raise CorruptVideoError(f"{path}: truncated: decoded {shown:.2f} s of the "
                                    f"{declared:.2f} s its header declares")
        if not frames:
            frames.append(last_image)
        if resampler is not None:
            for out in resampler.resample(None):
                audio_chunks.append(out.to_ndarray().reshape(-1))

    t = len(frames)
    audio = np.zeros(t * SAMPLES_PER_FRAME, np.float32)
    has_audio = bool(audio_chunks) and sum(c.size for c in audio_chunks) > 0
    if has_audio:
        wave = np.concatenate(audio_chunks).astype(np.float32)
        offset = round((t0 - (audio_start or t0)) * SAMPLE_RATE)
        if offset > 0:
            wave = wave[offset:]
        elif offset < 0:
            wave = np.concatenate([np.zeros(-offset, np.float32), wave])
        n = min(wave.size, audio.size)
        audio[:n] = np.clip(wave[:n], -1.0, 1.0)
    return Footage(frames=np.stack(frames), audio=audio, has_audio=has_audio,
                   source_fps=source_fps, source_size=source_size)
