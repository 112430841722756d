"""Log-mel spectrogram in JAX: the audio front end of the audio encoder.

Conventions (chosen so features match the usual speech front ends):

- Centre padding: the wave is reflect-padded by ``n_fft // 2`` on both sides, so frame ``k`` is
  centred on sample ``k * hop``; with 16 kHz audio and ``hop = 160`` frame ``k`` is the audio
  around time ``k / 100`` s. A wave of ``N`` samples gives ``1 + N // hop`` frames (librosa's
  count; Whisper drops the last of these).
- Periodic Hann window of length ``n_fft`` (the ``torch.hann_window`` default).
- Power spectrum ``|STFT|^2`` mapped onto ``n_mels`` bands by a filterbank on the Slaney mel
  scale with Slaney area normalisation (librosa's default, and Whisper's filters).
- Whisper's dynamic-range compression: ``log10(max(mel, 1e-10))``, floored at the clip's maximum
  minus 8 (80 dB below the loudest band), then ``(x + 4) / 4`` so values sit near [-1, 1].
  The maximum is taken per example, so a batch never mixes its examples.

The filterbank is built once in numpy (float64, cached) and enters the jitted graph as a
constant; the mel projection runs at HIGHEST precision because on TPU a default-precision f32
matmul uses bf16 passes, which would shift quiet bands by whole decibels.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

# Slaney mel scale: linear (3 mels per 200 Hz) below 1 kHz, logarithmic above.
_F_SP = 200.0 / 3.0
_MIN_LOG_HZ = 1000.0
_MIN_LOG_MEL = _MIN_LOG_HZ / _F_SP
_LOG_STEP = math.log(6.4) / 27.0


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """Hertz to Slaney mels (the scale librosa uses with ``htk=False``)."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / _F_SP
    log = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) / _LOG_STEP
    return np.where(hz >= _MIN_LOG_HZ, log, linear)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Inverse of :func:`hz_to_mel`."""
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * _F_SP
    log = _MIN_LOG_HZ * np.exp(_LOG_STEP * (np.maximum(mel, _MIN_LOG_MEL) - _MIN_LOG_MEL))
    return np.where(mel >= _MIN_LOG_MEL, log, linear)


@functools.lru_cache(maxsize=16)
def _filterbank(sample_rate: int, n_fft: int, n_mels: int, fmin: float,
                fmax: float) -> np.ndarray:
    n_freq = n_fft // 2 + 1
    fft_hz = np.linspace(0.0, sample_rate / 2.0, n_freq)
    # n_mels triangles need n_mels + 2 edges, evenly spaced in mels.
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(fmin), hz_to_mel(fmax), n_mels + 2))
    lo, centre, hi = edges_hz[:-2], edges_hz[1:-1], edges_hz[2:]
    f = fft_hz[:, None]
    rising = (f - lo) / (centre - lo)
    falling = (hi - f) / (hi - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    # Slaney area normalisation: every triangle has the same area, so a band's value is an
    # average power density rather than growing with the band's width.
    weights *= 2.0 / (hi - lo)
    weights.setflags(write=False)
    return weights


def mel_filterbank(sample_rate: int = 16000, n_fft: int = 400, n_mels: int = 80,
                   fmin: float = 0.0, fmax: float | None = None) -> np.ndarray:
    """Slaney-normalised triangular mel filters, shape ``[n_fft // 2 + 1, n_mels]`` (float64).

    Laid out ``[frequency, mel]`` so a power spectrum ``[..., frequency]`` maps to mels with one
    matmul; librosa and Whisper store the transpose. ``fmax`` defaults to Nyquist. The array is
    cached and read-only.
    """
    fmax = sample_rate / 2.0 if fmax is None else float(fmax)
    if not 0.0 <= fmin < fmax <= sample_rate / 2.0:
        raise ValueError(f"need 0 <= fmin < fmax <= sample_rate / 2 = {sample_rate / 2}, "
                         f"got fmin={fmin}, fmax={fmax}")
    if n_mels < 1 or n_fft < 2:
        raise ValueError(f"need n_mels >= 1 and n_fft >= 2, got n_mels={n_mels}, n_fft={n_fft}")
    return _filterbank(int(sample_rate), int(n_fft), int(n_mels), float(fmin), fmax)


def hann_window(n: int) -> np.ndarray:
    """Periodic Hann window (one period of a cosine over ``n + 1`` points, last one dropped)."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


def num_mel_frames(num_samples: int, hop: int = 160) -> int:
    """Frames the centred STFT gives for ``num_samples`` samples: ``1 + num_samples // hop``."""
    return 1 + num_samples // hop


def log_mel_spectrogram(wave: jnp.ndarray, *, sample_rate: int = 16000, n_fft: int = 400,
                        hop: int = 160, n_mels: int = 80, fmin: float = 0.0,
                        fmax: float | None = None) -> jnp.ndarray:
    """Whisper-style log-mel features of a batch of mono waves.

    Args:
      wave: ``[B, N]`` float samples in [-1, 1].
    Returns:
      ``[B, 1 + N // hop, n_mels]`` float32; frame ``k`` is centred on sample ``k * hop``.
    """
    if wave.ndim != 2:
        raise ValueError(f"wave must be [batch, samples], got shape {tuple(wave.shape)}")
    num_samples = wave.shape[1]
    pad = n_fft // 2
    if num_samples <= pad:
        raise ValueError(f"wave has {num_samples} samples; reflect padding needs more than "
                         f"n_fft // 2 = {pad}")
    filters = jnp.asarray(mel_filterbank(sample_rate, n_fft, n_mels, fmin, fmax), jnp.float32)
    x = jnp.pad(wave.astype(jnp.float32), ((0, 0), (pad, pad)), mode="reflect")
    num_frames = num_mel_frames(num_samples, hop)
    index = np.arange(num_frames)[:, None] * hop + np.arange(n_fft)[None, :]
    frames = x[:, index] * jnp.asarray(hann_window(n_fft), jnp.float32)  # [B, T, n_fft]
    spectrum = jnp.fft.rfft(frames, axis=-1)
    power = jnp.square(spectrum.real) + jnp.square(spectrum.imag)
    mel = jnp.matmul(power, filters, precision=jax.lax.Precision.HIGHEST)
    log_mel = jnp.log10(jnp.maximum(mel, 1e-10))
    peak = jnp.max(log_mel, axis=(1, 2), keepdims=True)
    log_mel = jnp.maximum(log_mel, peak - 8.0)
    return (log_mel + 4.0) / 4.0
