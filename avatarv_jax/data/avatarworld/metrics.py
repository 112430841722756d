"""Exact AvatarWorld metrics for generated video (DESIGN.md §9).

All metrics read generated frames through the probe and compare with what the world knows: the
mouth track of the driving audio (``speech.mouth_track``), the reference person's static
attributes and dynamic style. Higher is better for every score except the drift numbers, which
should be near zero. ``score_clip`` runs them all and returns one flat dict for JSON.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from avatarv_jax.data.avatarworld import identity as idn
from avatarv_jax.data.avatarworld import motion as mo
from avatarv_jax.data.avatarworld import speech
from avatarv_jax.data.avatarworld.identity import style_to_physical

CLOSED_BELOW = 0.2  # a reading below this counts as closed (the probe reads shut mouths at ~0.1)
STYLE_FIELDS = ("mouth_gain", "nod_rate_hz", "nod_amplitude", "blink_rate_per_min", "smile_habit")


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.size < 3 or a.std() < 1e-8 or b.std() < 1e-8:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def lip_sync(pred_open: np.ndarray, audio: np.ndarray, max_lag: int = 2) -> dict[str, float]:
    """Pearson correlation of the read mouth opening with the audio's mouth track.

    The best lag within +-max_lag frames is taken (a positive lag: the video is late) so a
    one-frame offset of an otherwise perfect video still scores ~1.
    """
    pred = np.asarray(pred_open, np.float64)
    truth = speech.mouth_track(audio, num_frames=pred.size)
    best, best_lag = -1.0, 0
    for lag in range(-max_lag, max_lag + 1):
        if lag >= 0:
            c = _corr(pred[lag:], truth[:truth.size - lag])
        else:
            c = _corr(pred[:lag], truth[-lag:])
        if c > best:
            best, best_lag = c, lag
    return {"lip_sync_corr": best, "lip_sync_lag": float(best_lag)}


def silence_closure(pred_open: np.ndarray, audio: np.ndarray) -> dict[str, float]:
    """How shut the mouth is where the audio is silent: fraction of silent frames read as
    closed, and the mean opening there. NaN when the audio has no silent frame."""
    pred = np.asarray(pred_open, np.float64)
    silent = speech.silent_frames(audio, num_frames=pred.size)
    if not silent.any():
        return {"silence_closed_fraction": float("nan"), "silence_mean_open": float("nan")}
    return {"silence_closed_fraction": float((pred[silent] < CLOSED_BELOW).mean()),
            "silence_mean_open": float(pred[silent].mean())}


def attribute_agreement(attributes: np.ndarray, reference: np.ndarray) -> float:
    """Fraction of static attributes read from the video that match the reference."""
    attributes, reference = np.asarray(attributes), np.asarray(reference)
    if attributes.shape != (idn.NUM_ATTRIBUTES,) or reference.shape != (idn.NUM_ATTRIBUTES,):
        raise ValueError(f"attribute vectors must have shape ({idn.NUM_ATTRIBUTES},)")
    return float((attributes == reference).mean())


def embedding_similarity(embedding: np.ndarray, reference: np.ndarray) -> float:
    """Cosine similarity of two identity embeddings (probe.ClipReadout.embedding)."""
    a, b = np.asarray(embedding, np.float64), np.asarray(reference, np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))


def estimate_style(motion: np.ndarray, audio: np.ndarray) -> dict[str, float]:
    """Dynamic style estimated from (read) motion and the audio that drove it.

    mouth_gain: least-squares slope of mouth opening on the audio mouth track, through the
    origin, over sounding frames that are not saturated; nod_rate_hz: the strongest frequency
    of head_pitch in 0.3-3 Hz; nod_amplitude: sqrt(2) * std(head_pitch) divided by the mean
    talking envelope (0.4 + 0.6 activity), as in motion_from_audio; blink_rate_per_min: upward
    crossings of blink = 0.5 per minute; smile_habit: mean smile / 0.85.
    """
    motion = np.asarray(motion, np.float64)
    t = motion.shape[0]
    feats = speech.audio_features(audio, t)
    opening = mo.field(motion, "mouth_open")
    use = feats.gate & (feats.open > 0.05) & (opening < 0.95)
    gain = float((opening[use] * feats.open[use]).sum() / max((feats.open[use] ** 2).sum(), 1e-9)) \
        if use.sum() >= 3 else float("nan")

    pitch = mo.field(motion, "head_pitch")
    pitch = pitch - pitch.mean()
    n_fft = max(1024, 4 * (1 << int(np.ceil(np.log2(max(t, 2))))))  # zero-padded
    spec = np.abs(np.fft.rfft(pitch * np.hanning(t), n_fft))
    freqs = np.fft.rfftfreq(n_fft, 1.0 / speech.FPS)
    band = (freqs >= 0.3) & (freqs <= 3.0)
    nod_rate = float(freqs[band][np.argmax(spec[band])]) if t >= 8 else float("nan")
    activity = np.convolve(feats.gate.astype(np.float64), np.ones(9) / 9, mode="same")
    nod_amp = float(np.sqrt(2) * pitch.std() / np.mean(0.4 + 0.6 * activity))

    blink = mo.field(motion, "blink")
    onsets = int(((blink[1:] >= 0.5) & (blink[:-1] < 0.5)).sum() + (blink[0] >= 0.5))
    blink_rate = onsets / (t / speech.FPS / 60.0)
    smile = float(mo.field(motion, "smile").mean() / 0.85)
    return {"mouth_gain": gain, "nod_rate_hz": nod_rate, "nod_amplitude": nod_amp,
            "blink_rate_per_min": blink_rate, "smile_habit": smile}


def style_match(estimated: dict[str, float], true_style: np.ndarray) -> dict[str, float]:
    """Per-field closeness 1 - |estimate - truth| / range (clipped to [0, 1]) and their mean.

    ``true_style`` is the reference identity's [0, 1] style vector.
    """
    truth = style_to_physical(true_style)
    out = {}
    for name in STYLE_FIELDS:
        lo, hi = idn.DYNAMIC_STYLE_RANGES[name]
        est = estimated[name]
        out[f"style_{name}"] = 0.0 if not np.isfinite(est) else float(
            np.clip(1 - abs(est - truth[name]) / (hi - lo), 0, 1))
    out["style_match"] = float(np.mean([out[f"style_{n}"] for n in STYLE_FIELDS]))
    return out


def windows(num_frames: int, window: int, hop: int) -> list[slice]:
    """Frame windows for metrics over time (the last partial window is dropped)."""
    if window < 1 or hop < 1:
        raise ValueError("window and hop must be positive")
    return [slice(s, s + window) for s in range(0, max(num_frames - window, 0) + 1, hop)]


def over_time(fn: Callable[[slice], float], num_frames: int, window: int = 50,
              hop: int = 25) -> np.ndarray:
    """``fn`` evaluated on consecutive frame windows: a metric as a time series."""
    return np.array([fn(w) for w in windows(num_frames, window, hop)], np.float64)


def drift(series: Sequence[float], hop_s: float = 1.0) -> dict[str, float]:
    """How a metric moves over a video: least-squares slope per second, and last - first."""
    y = np.asarray(series, np.float64)
    if y.size < 2:
        return {"slope_per_s": 0.0, "last_minus_first": 0.0}
    x = np.arange(y.size) * hop_s
    slope = float(np.polyfit(x, y, 1)[0])
    return {"slope_per_s": slope, "last_minus_first": float(y[-1] - y[0])}


def score_clip(probe, frames: np.ndarray, audio: np.ndarray, *,
               reference_attributes: np.ndarray | None = None,
               reference_embedding: np.ndarray | None = None,
               reference_style: np.ndarray | None = None,
               window: int = 50, hop: int = 25) -> dict[str, float]:
    """Every AvatarWorld metric for one generated clip, as a flat dict.

    ``reference_*`` describe the person the video should show: their true attributes and style
    (AvatarWorld knows them) and/or an embedding read from the reference video with
    ``probe.read_clip(ref_frames).embedding``. Time series use ``window``/``hop`` frames.
    """
    r = probe.read_clip(frames)
    opening = mo.field(r.motion, "mouth_open")
    out: dict[str, float] = {"num_frames": float(len(opening))}
    out.update(lip_sync(opening, audio))
    out.update(silence_closure(opening, audio))
    spf = speech.SAMPLES_PER_FRAME
    lip = over_time(lambda w: lip_sync(opening[w], audio[w.start * spf:w.stop * spf])
                    ["lip_sync_corr"], len(opening), window, hop)
    for k, v in drift(lip, hop / speech.FPS).items():
        out[f"lip_sync_drift_{k}"] = v
    if reference_attributes is not None:
        out["attribute_agreement"] = attribute_agreement(r.attributes, reference_attributes)
    ref_emb = reference_embedding
    if ref_emb is not None:
        out["embedding_similarity"] = embedding_similarity(r.embedding, ref_emb)
        sim = over_time(lambda w: embedding_similarity(r.frame_embeddings[w].mean(0), ref_emb),
                        len(opening), window, hop)
        for k, v in drift(sim, hop / speech.FPS).items():
            out[f"identity_drift_{k}"] = v
    if reference_style is not None:
        out.update(style_match(estimate_style(r.motion, audio), reference_style))
    return out
