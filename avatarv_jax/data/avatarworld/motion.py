"""Per-frame motion vectors: the exact rendering parameters that move, driven by audio + style.

The motion vector is the interface to the model's motion stream (DESIGN.md §3.3): one float32
vector of ``MOTION_DIM`` per video frame, every field in a normalised range (``MOTION_RANGES``).
The renderer draws a frame from (identity, scene, motion vector) alone, so these numbers are the
ground truth of everything that moves.
"""

from __future__ import annotations

import numpy as np

from avatarv_jax.data.avatarworld import speech
from avatarv_jax.data.avatarworld.identity import style_to_physical

# name -> (low, high). Order is the order in the vector.
MOTION_RANGES: dict[str, tuple[float, float]] = {
    "mouth_open": (0.0, 1.0),   # jaw/lip opening; 0 = lips together
    "lip_round": (0.0, 1.0),    # 0 = spread lips, 1 = pursed (fuller, round opening)
    "head_yaw": (-1.0, 1.0),    # +1 = turned 43 degrees to the image's right
    "head_pitch": (-1.0, 1.0),  # +1 = nodded 20 degrees down
    "head_roll": (-1.0, 1.0),   # +1 = tilted 11.5 degrees clockwise
    "blink": (0.0, 1.0),        # 0 = eyes open, 1 = lids shut
    "brow": (0.0, 1.0),         # brow raise
    "smile": (0.0, 1.0),        # mouth corners up, lips wider
    "gaze_x": (-1.0, 1.0),      # irises left/right inside the eye
    "gaze_y": (-1.0, 1.0),      # irises up/down
}
MOTION_FIELDS: tuple[str, ...] = tuple(MOTION_RANGES)
MOTION_DIM = len(MOTION_FIELDS)
MOTION_LOW = np.array([lo for lo, _ in MOTION_RANGES.values()], np.float32)
MOTION_HIGH = np.array([hi for _, hi in MOTION_RANGES.values()], np.float32)

TEETH_VISIBLE_OPEN = 0.5    # the teeth pattern can be read when mouth_open >= this
MARK_VISIBLE_YAW = 0.6      # the side mark faces the camera when head_yaw >= this
EYES_VISIBLE_BLINK = 0.5    # eye colour and shape can be read when blink <= this

BLINK_PROFILE = np.array([0.45, 1.0, 1.0, 0.6, 0.2], np.float32)


def field(motion: np.ndarray, name: str) -> np.ndarray:
    """One named column of a [..., MOTION_DIM] motion array."""
    return motion[..., MOTION_FIELDS.index(name)]


def attribute_visibility(motion: np.ndarray) -> dict[str, np.ndarray]:
    """bool [...] per conditional attribute: can this frame show it?"""
    return {"teeth": field(motion, "mouth_open") >= TEETH_VISIBLE_OPEN,
            "mark": field(motion, "head_yaw") >= MARK_VISIBLE_YAW,
            "eye_color": field(motion, "blink") <= EYES_VISIBLE_BLINK,
            "eye_shape": field(motion, "blink") <= EYES_VISIBLE_BLINK}


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    if width <= 1 or x.size == 0:
        return x
    k = np.hanning(width + 2)[1:-1]
    k /= k.sum()
    return np.convolve(np.pad(x, width, mode="edge"), k, mode="same")[width:-width]


def _events(rng: np.random.Generator, num_frames: int, rate_per_min: float) -> np.ndarray:
    """Frame indices of a Poisson process with the given rate."""
    expected = rate_per_min * num_frames / (60.0 * speech.FPS)
    n = rng.poisson(expected)
    return np.sort(rng.integers(0, max(num_frames, 1), n))


def syllable_peaks(features: speech.AudioFeatures, min_gap: int = 5) -> np.ndarray:
    """Stressed syllables: loudness maxima over +-3 frames above 0.8, at least min_gap apart."""
    loud = np.where(features.gate, features.loud, 0.0)
    t = loud.size
    peaks = []
    for i in range(t):
        lo, hi = max(0, i - 3), min(t, i + 4)
        if loud[i] >= 0.8 and loud[i] == loud[lo:hi].max() and (not peaks or i - peaks[-1] >= min_gap):
            peaks.append(i)
    return np.array(peaks, np.int64)


def motion_from_audio(audio: np.ndarray, style: np.ndarray, rng: np.random.Generator,
                      num_frames: int | None = None) -> np.ndarray:
    """float32 [T, MOTION_DIM]: the person's motion while saying ``audio``.

    mouth_open = clip(mouth_gain * mouth_track(audio), 0, 1) exactly, so the mouth closes in
    silence and its gain is readable from video; nodding follows a sinusoid at the person's nod
    rate whose amplitude rises while talking; blinks are a Poisson process at the blink rate;
    brows lift on stressed syllables; sway and look-aside turns move the head.
    """
    feats = speech.audio_features(audio, num_frames)
    t_frames = feats.open.size
    st = style_to_physical(style)
    time = np.arange(t_frames, dtype=np.float64) / speech.FPS
    m = np.zeros((t_frames, MOTION_DIM), np.float64)
    col = {n: i for i, n in enumerate(MOTION_FIELDS)}

    m[:, col["mouth_open"]] = np.clip(st["mouth_gain"] * feats.open, 0, 1)
    talking = feats.gate.astype(np.float64)
    shape = 0.5 - feats.bright  # dark (low-centroid) sounds round the lips
    m[:, col["lip_round"]] = np.clip(0.2 + 0.5 * st["lip_rounding"] + 0.6 * shape * talking, 0, 1)

    activity = _smooth(talking, 9)
    nod_phase = rng.uniform(0, 2 * np.pi)
    nod = st["nod_amplitude"] * (0.4 + 0.6 * activity) * np.sin(
        2 * np.pi * st["nod_rate_hz"] * time + nod_phase)
    m[:, col["head_pitch"]] = nod + 0.04 * _smooth(rng.standard_normal(t_frames), 15)

    sway_rate = rng.uniform(0.12, 0.3)
    sway = st["sway_amplitude"] * np.sin(2 * np.pi * sway_rate * time + rng.uniform(0, 2 * np.pi))
    turns = np.zeros(t_frames)
    for start in _events(rng, t_frames, st["turn_rate_per_min"]):
        length = int(rng.uniform(0.8, 1.6) * speech.FPS)
        target = rng.choice([-1.0, 1.0]) * rng.uniform(0.65, 0.95)
        bump = target * np.sin(np.linspace(0, np.pi, length)) ** 2 * 1.15
        end = min(t_frames, start + length)
        turns[start:end] += bump[:end - start]
    m[:, col["head_yaw"]] = sway + turns
    m[:, col["head_roll"]] = 0.6 * st["sway_amplitude"] * np.sin(
        2 * np.pi * sway_rate * 0.8 * time + rng.uniform(0, 2 * np.pi))

    blink = np.zeros(t_frames)
    for start in _events(rng, t_frames, st["blink_rate_per_min"]):
        end = min(t_frames, start + BLINK_PROFILE.size)
        blink[start:end] = np.maximum(blink[start:end], BLINK_PROFILE[:end - start])
    m[:, col["blink"]] = blink

    brow = np.zeros(t_frames)
    decay = np.exp(-np.arange(10) / 3.0)
    for p in syllable_peaks(feats):
        end = min(t_frames, p + decay.size)
        brow[p:end] = np.maximum(brow[p:end], st["brow_raise"] * decay[:end - p])
    m[:, col["brow"]] = brow

    calm = 1.0 - activity
    smile_wave = 0.5 + 0.5 * np.sin(2 * np.pi * 0.1 * time + rng.uniform(0, 2 * np.pi))
    m[:, col["smile"]] = 0.8 * st["smile_habit"] + 0.25 * calm * smile_wave * st["smile_habit"]

    gaze = np.zeros((t_frames, 2))
    i = 0
    while i < t_frames:
        hold = int(rng.uniform(0.5, 2.0) * speech.FPS)
        gaze[i:i + hold] = rng.uniform(-0.6, 0.6, 2)
        i += hold
    m[:, col["gaze_x"]] = gaze[:, 0]
    m[:, col["gaze_y"]] = gaze[:, 1]
    return np.clip(m, MOTION_LOW, MOTION_HIGH).astype(np.float32)


def random_motion(rng: np.random.Generator, n: int) -> np.ndarray:
    """float32 [n, MOTION_DIM] drawn independently per frame over the whole range.

    Used to train the probe: it must read any pose, not only the poses speech produces.
    """
    m = rng.uniform(MOTION_LOW, MOTION_HIGH, (n, MOTION_DIM))
    col = {k: i for i, k in enumerate(MOTION_FIELDS)}
    closed = rng.random(n) < 0.2  # many real frames have the mouth shut
    m[closed, col["mouth_open"]] = 0.0
    open_eyes = rng.random(n) < 0.6
    m[open_eyes, col["blink"]] = 0.0
    for name, scale in (("head_pitch", 0.7), ("head_roll", 0.7)):
        m[:, col[name]] *= scale
    return np.clip(m, MOTION_LOW, MOTION_HIGH).astype(np.float32)
