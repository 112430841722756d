"""Who a person is in AvatarWorld: static look, dynamic style, voice, and the data split.

Everything is a pure function of the integer identity id (and the world seed), so a person is the
same in every clip, shard and process. Static attributes are small discrete class indices, which
makes "did the generated video keep the look" an exact question. The dynamic style is a float
vector in [0, 1] (each field maps linearly onto the physical range in ``DYNAMIC_STYLE_RANGES``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

WORLD_SEED = 20250917
"""Mixed into every random stream, so two worlds can be told apart by changing one constant."""

# name -> class names. The order of this table is the order of the static attribute vector.
STATIC_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "face_shape": ("round", "oval", "long", "square"),
    "skin_tone": ("porcelain", "light", "tan", "brown", "deep"),
    "skin_texture": ("smooth", "freckles", "blush", "stubble"),
    "hair_style": ("shaved", "short", "long", "bun", "curly"),
    "hair_color": ("black", "brown", "blond", "auburn", "grey"),
    "eye_color": ("brown", "blue", "green"),
    "eye_shape": ("round", "almond", "narrow"),
    "brow_style": ("thin", "thick", "arched"),
    "nose": ("button", "wide", "long"),
    "mouth_width": ("narrow", "medium", "wide"),
    "lip_color": ("pink", "red", "plum"),
    "teeth": ("even", "gap", "gold", "braces"),
    "accessory": ("none", "glasses", "earrings", "headband"),
    "mark": ("none", "mole", "scar", "tattoo"),
}
ATTRIBUTE_NAMES: tuple[str, ...] = tuple(STATIC_ATTRIBUTES)
NUM_CLASSES: tuple[int, ...] = tuple(len(v) for v in STATIC_ATTRIBUTES.values())
NUM_ATTRIBUTES = len(ATTRIBUTE_NAMES)

# Attributes that a single frame does not always show (see motion.attribute_visibility).
CONDITIONAL_ATTRIBUTES = {
    "teeth": "seen only while the mouth is open",
    "mark": "on the side of the face, seen only while the head is turned to the camera's right",
    "eye_color": "hidden while the eyes are closed",
    "eye_shape": "hidden while the eyes are closed (the lid covers the eye's height)",
}

# name -> (low, high) physical range; the style vector holds (value - low) / (high - low).
DYNAMIC_STYLE_RANGES: dict[str, tuple[float, float]] = {
    "mouth_gain": (0.55, 1.35),        # mouth_open = clip(gain * audio mouth track, 0, 1)
    "lip_rounding": (0.0, 1.0),        # habitual rounding added to the audio-driven lip shape
    "nod_rate_hz": (0.5, 2.0),         # frequency of the speaking nod
    "nod_amplitude": (0.08, 0.6),      # head_pitch amplitude of the nod (motion units)
    "blink_rate_per_min": (5.0, 40.0),
    "brow_raise": (0.0, 1.0),          # brow lift on stressed syllables
    "sway_amplitude": (0.05, 0.35),    # slow head_yaw / head_roll sway (motion units)
    "smile_habit": (0.0, 1.0),         # baseline smile level
    "turn_rate_per_min": (4.0, 16.0),  # look-aside head turns (these reveal the side mark)
}
DYNAMIC_STYLE_FIELDS: tuple[str, ...] = tuple(DYNAMIC_STYLE_RANGES)
DYNAMIC_STYLE_DIM = len(DYNAMIC_STYLE_FIELDS)

HELDOUT_MODULUS = 8
"""Ids with ``id % HELDOUT_MODULUS == HELDOUT_MODULUS - 1`` are held out (identities and scenes)."""

# espeak-ng voice variants (all ship with espeak-ng); a person keeps one voice in every language.
VOICE_VARIANTS: tuple[str, ...] = ("m1", "m3", "m5", "f1", "f2", "f4", "Annie", "Andy",
                                   "klatt", "linda", "Michael", "steph")


@dataclasses.dataclass(frozen=True)
class Voice:
    """How a person sounds: an espeak-ng variant, a pitch (0..99) and a rate (words/min)."""

    variant: str
    pitch: int
    speed: int


@dataclasses.dataclass(frozen=True)
class Identity:
    """One person: discrete look, dynamic style in [0, 1], voice and a private texture seed."""

    identity_id: int
    attributes: np.ndarray      # int32 [NUM_ATTRIBUTES], class indices into STATIC_ATTRIBUTES
    style: np.ndarray           # float32 [DYNAMIC_STYLE_DIM], in [0, 1]
    voice: Voice
    texture_seed: int           # freckle / stubble placement, unique per person

    def attribute(self, name: str) -> int:
        return int(self.attributes[ATTRIBUTE_NAMES.index(name)])

    def attribute_labels(self) -> dict[str, str]:
        return {n: STATIC_ATTRIBUTES[n][int(i)] for n, i in zip(ATTRIBUTE_NAMES, self.attributes)}

    def style_value(self, name: str) -> float:
        return float(style_to_physical(self.style)[name])


def rng_for(*keys: int | str) -> np.random.Generator:
    """A generator seeded by the world seed and ``keys``; strings are hashed stably (not hash())."""
    words = [WORLD_SEED]
    for k in keys:
        if isinstance(k, str):
            words.append(int.from_bytes(k.encode("utf-8")[:8].ljust(8, b"\0"), "little") % (2**63))
        else:
            if int(k) < 0:
                raise ValueError(f"random-stream keys must be non-negative, got {k}")
            words.append(int(k))
    return np.random.default_rng(words)


def split_of(item_id: int) -> str:
    """``"train"`` or ``"heldout"`` for an identity or scene id (a fixed, documented rule)."""
    if item_id < 0:
        raise ValueError(f"ids are non-negative integers, got {item_id}")
    return "heldout" if item_id % HELDOUT_MODULUS == HELDOUT_MODULUS - 1 else "train"


def ids_in_split(split: str, count: int, start: int = 0) -> list[int]:
    """The first ``count`` ids (from ``start``) that belong to ``split``."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    out, i = [], start
    while len(out) < count:
        if split_of(i) == split:
            out.append(i)
        i += 1
    return out


def style_to_physical(style: np.ndarray) -> dict[str, float]:
    """Map a [0, 1] style vector onto the physical ranges of ``DYNAMIC_STYLE_RANGES``."""
    style = np.asarray(style, np.float32)
    if style.shape != (DYNAMIC_STYLE_DIM,):
        raise ValueError(f"style vector must have shape ({DYNAMIC_STYLE_DIM},), got {style.shape}")
    return {n: lo + float(s) * (hi - lo)
            for n, s, (lo, hi) in zip(DYNAMIC_STYLE_FIELDS, style, DYNAMIC_STYLE_RANGES.values())}


def style_from_physical(values: dict[str, float]) -> np.ndarray:
    """Inverse of ``style_to_physical`` (missing fields are an error)."""
    missing = [n for n in DYNAMIC_STYLE_FIELDS if n not in values]
    if missing:
        raise ValueError(f"missing style fields: {missing}")
    return np.array([(values[n] - lo) / (hi - lo)
                     for n, (lo, hi) in DYNAMIC_STYLE_RANGES.items()], np.float32)


def sample_identity(identity_id: int) -> Identity:
    """The person with this id; attributes and style are drawn independently of each other."""
    rng = rng_for("identity", identity_id)
    attrs = np.array([rng.integers(k) for k in NUM_CLASSES], np.int32)
    style = rng.uniform(0.0, 1.0, DYNAMIC_STYLE_DIM).astype(np.float32)
    voice = Voice(variant=str(VOICE_VARIANTS[rng.integers(len(VOICE_VARIANTS))]),
                  pitch=int(rng.integers(25, 75)), speed=int(rng.integers(135, 180)))
    return Identity(identity_id=int(identity_id), attributes=attrs, style=style, voice=voice,
                    texture_seed=int(rng.integers(2**31)))
