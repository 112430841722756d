"""Reading the user's files and writing the result, all through PyAV (FFmpeg).

- ``read_video``: a reference clip as 25 fps RGB frames scaled and centre-cropped to the output
  size (nearest decoded frame for each output time, so any source frame rate works), plus its
  own sound at 16 kHz when it has any. Reading stops after ``max_frames``.
- ``read_audio``: any audio file FFmpeg reads (wav, mp3, flac, m4a, ogg...), at its own rate
  (for the output file) and resampled to 16 kHz mono (for the audio encoder).
- ``Mp4Writer``: H.264 + AAC, frames written as they are decoded (the whole video is never in
  memory), the sound interleaved as the video advances; written under a temporary name in the
  output folder and renamed at the end, so a failed run leaves no file behind.

Every unreadable input raises ``InferenceInputError`` naming the file and the problem.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from avatarv_jax.inference.errors import InferenceInputError

SAMPLE_RATE = 16000    # the audio encoder's rate
FPS = 25               # the model's frame rate
AAC_FRAME = 1024       # samples per AAC frame
AAC_RATES = (8000, 11025, 12000, 16000, 22050, 24000, 32000, 44100, 48000, 64000, 88200, 96000)


def _av():
    try:
        import av
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("inference reads and writes media with PyAV: pip install av") from e
    return av


@dataclasses.dataclass(frozen=True)
class AudioTrack:
    """A sound at its own rate (``pcm`` float32 [channels, N]) and at 16 kHz mono (``wave``)."""

    pcm: np.ndarray
    rate: int
    wave: np.ndarray

    @property
    def seconds(self) -> float:
        return self.pcm.shape[1] / self.rate

    @property
    def layout(self) -> str:
        return "mono" if self.pcm.shape[0] == 1 else "stereo"

    @classmethod
    def from_wave(cls, wave: np.ndarray) -> "AudioTrack":
        """A 16 kHz mono waveform (e.g. espeak-ng speech) as a track."""
        wave = np.ascontiguousarray(wave, np.float32)
        return cls(pcm=wave[None], rate=SAMPLE_RATE, wave=wave)


@dataclasses.dataclass(frozen=True)
class VideoClip:
    """Reference frames uint8 [T, H, W, 3] at 25 fps and the clip's sound at 16 kHz (or None)."""

    frames: np.ndarray
    audio: np.ndarray | None
    source_fps: float


def _check_file(path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise InferenceInputError(f"{what} not found: {path}")
    if not path.is_file():
        raise InferenceInputError(f"{what} is not a file: {path}")
    if not os.access(path, os.R_OK):
        raise InferenceInputError(f"{what} is not readable: {path}")
    return path


def _open(path: Path, what: str):
    av = _av()
    try:
        return av.open(str(path), mode="r")
    except (av.FFmpegError, OSError, ValueError) as e:
        raise InferenceInputError(f"cannot read {what} {path}: {e}") from None


def _cover_crop(frame, size: tuple[int, int]) -> np.ndarray:
    """Scale ``frame`` (a PyAV VideoFrame) to cover ``size`` keeping its aspect, crop the centre."""
    h, w = size
    scale = max(h / frame.height, w / frame.width)
    sh, sw = max(h, round(frame.height * scale)), max(w, round(frame.width * scale))
    rgb = frame.reformat(width=sw, height=sh, format="rgb24").to_ndarray()
    top, left = (sh - h) // 2, (sw - w) // 2
    return np.ascontiguousarray(rgb[top:top + h, left:left + w])


def _decode_audio(container, stream, rates: list[tuple[int, str]], limit: int | None = None
                  ) -> list[np.ndarray]:
    """Decode ``stream`` once into float32 [channels, N] at each (rate, layout) of ``rates``."""
    av = _av()
    resamplers = [av.AudioResampler(format="fltp", layout=layout, rate=rate)
                  for rate, layout in rates]
    pieces: list[list[np.ndarray]] = [[] for _ in rates]
    counts = [0] * len(rates)

    def add(i, frames):
        for f in frames:
            pieces[i].append(f.to_ndarray().astype(np.float32, copy=False))
            counts[i] += f.samples

    for frame in container.decode(stream):
        for i, r in enumerate(resamplers):
            add(i, r.resample(frame))
        if limit is not None and counts[0] >= limit:
            break
    for i, r in enumerate(resamplers):
        add(i, r.resample(None))
    channels = [1 if layout == "mono" else 2 for _, layout in rates]
    return [np.concatenate(p, axis=1) if p else np.zeros((c, 0), np.float32)
            for p, c in zip(pieces, channels)]


def read_audio(path) -> AudioTrack:
    """An audio file as an ``AudioTrack``; mono stays mono, anything else becomes stereo."""
    av = _av()
    path = _check_file(path, "audio file")
    with _open(path, "audio file") as container:
        if not container.streams.audio:
            raise InferenceInputError(f"audio file {path} has no audio stream")
        stream = container.streams.audio[0]
        rate = int(stream.rate or stream.codec_context.sample_rate or SAMPLE_RATE)
        if rate not in AAC_RATES:
            rate = 48000 if rate > 48000 else 44100 if rate > 16000 else SAMPLE_RATE
        layout = "mono" if (stream.channels or stream.codec_context.channels) == 1 else "stereo"
        try:
            pcm, wave = _decode_audio(container, stream, [(rate, layout), (SAMPLE_RATE, "mono")])
        except av.FFmpegError as e:
            raise InferenceInputError(f"cannot decode audio file {path}: {e}") from None
    if pcm.shape[1] == 0 or wave.shape[1] == 0:
        raise InferenceInputError(f"audio file {path} is empty (no samples)")
    return AudioTrack(pcm=np.ascontiguousarray(pcm), rate=rate, wave=np.ascontiguousarray(wave[0]))


def read_video(path, size: tuple[int, int], *, max_frames: int, what: str = "reference video"
               ) -> VideoClip:
    """Up to ``max_frames`` frames at 25 fps, covered and centre-cropped to ``size`` (H, W)."""
    av = _av()
    path = _check_file(path, what)
    frames: list[np.ndarray] = []
    with _open(path, what) as container:
        if not container.streams.video:
            raise InferenceInputError(f"{what} {path} has no video stream")
        stream = container.streams.video[0]
        rate = float(stream.average_rate or stream.guessed_rate or FPS)
        try:
            _resample_frames(container.decode(stream), rate, size, max_frames, frames)
        except av.FFmpegError as e:
            if not frames:
                raise InferenceInputError(f"{what} {path} has no decodable frames ({e})") \
                    from None
    if not frames:
        raise InferenceInputError(f"{what} {path} has no decodable frames")
    audio = _read_clip_audio(path, len(frames))
    return VideoClip(frames=np.stack(frames), audio=audio, source_fps=rate)


def _resample_frames(decoded, rate: float, size, max_frames: int, out: list) -> None:
    """Append the decoded frame nearest to each output time ``i / 25`` until the stream ends."""
    prev, prev_time, prev_rgb = None, None, None
    for index, frame in enumerate(decoded):
        t = frame.time if frame.time is not None else index / rate
        if prev is not None:
            boundary = 0.5 * (prev_time + t)        # outputs before it are nearer to prev
            while len(out) < max_frames and len(out) / FPS < boundary:
                if prev_rgb is None:
                    prev_rgb = _cover_crop(prev, size)
                out.append(prev_rgb)
        if len(out) >= max_frames:
            return
        prev, prev_time, prev_rgb = frame, t, None
    if prev is not None:
        end = prev_time + 1.0 / rate
        while len(out) < max_frames and len(out) / FPS < end - 1e-6:
            if prev_rgb is None:
                prev_rgb = _cover_crop(prev, size)
            out.append(prev_rgb)


def _read_clip_audio(path: Path, num_frames: int) -> np.ndarray | None:
    """The reference clip's own sound for its first ``num_frames`` frames at 16 kHz, or None."""
    av = _av()
    need = num_frames * SAMPLE_RATE // FPS
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.audio:
                return None
            (wave,) = _decode_audio(container, container.streams.audio[0],
                                    [(SAMPLE_RATE, "mono")], limit=need)
    except av.FFmpegError:
        return None
    wave = wave[0, :need]
    if wave.size == 0:
        return None
    return np.pad(wave, (0, need - wave.size)).astype(np.float32)


def temporary_name(path: Path) -> Path:
    """A hidden sibling of ``path`` for writing before the final rename."""
    return path.with_name(f".{path.stem}.partial-{os.getpid()}{path.suffix}")


class Mp4Writer:
    """H.264 (yuv420p) + AAC, fed chunk by chunk; renamed into place by ``finish``.

    Use as a context manager: leaving the block through an exception deletes the partial file.
    """

    def __init__(self, path, *, height: int, width: int, audio: AudioTrack, fps: int = FPS,
                 crf: int = 18):
        av = _av()
        if height % 2 or width % 2:
            raise InferenceInputError(f"H.264 needs even frame sizes, got {height}x{width}")
        self.path = Path(path)
        self.tmp = temporary_name(self.path)
        self.fps, self.audio = fps, audio
        self.frames_written = 0
        self._audio_pos = 0
        self._container = av.open(str(self.tmp), mode="w", format="mp4")
        self._video = self._container.add_stream("libx264", rate=fps)
        self._video.width, self._video.height = width, height
        self._video.pix_fmt = "yuv420p"
        self._video.options = {"crf": str(crf), "preset": "veryfast"}
        self._sound = self._container.add_stream("aac", rate=audio.rate)
        self._sound.layout = audio.layout

    def write(self, frames: np.ndarray) -> None:
        """Append uint8 [n, H, W, 3] frames, and the sound up to the new end of the video."""
        av = _av()
        for frame in np.asarray(frames, np.uint8):
            for packet in self._video.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                self._container.mux(packet)
        self.frames_written += len(frames)
        self._write_audio(self.frames_written * self.audio.rate // self.fps, final=False)

    def _write_audio(self, until: int, *, final: bool) -> None:
        av = _av()
        pcm = self.audio.pcm
        until = min(until, pcm.shape[1])
        while self._audio_pos < until and (final or self._audio_pos + AAC_FRAME <= until):
            end = min(self._audio_pos + AAC_FRAME, until)
            block = np.ascontiguousarray(np.clip(pcm[:, self._audio_pos:end], -1.0, 1.0))
            frame = av.AudioFrame.from_ndarray(block, format="fltp", layout=self.audio.layout)
            frame.sample_rate, frame.pts = self.audio.rate, self._audio_pos
            for packet in self._sound.encode(frame):
                self._container.mux(packet)
            self._audio_pos = end

    def finish(self) -> Path:
        """Flush both encoders, close the file and rename it to its final name."""
        for packet in self._video.encode():
            self._container.mux(packet)
        self._write_audio(self.audio.pcm.shape[1], final=True)
        for packet in self._sound.encode():
            self._container.mux(packet)
        self._container.close()
        self._container = None
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # noqa: BLE001 - the file is deleted anyway
                pass
            self._container = None
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None or self._container is not None:
            self.abort()
