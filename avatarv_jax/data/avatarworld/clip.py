"""One AvatarWorld clip: a person in a scene saying something, with all of its ground truth.

Frame counts of the form 1 + 4k suit the causal video VAE (its first latent frame holds one
video frame, every later one four); ``frames_for_vae`` rounds to that form. It is advice, not a
rule: clips of any length render.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from avatarv_jax.data.avatarworld import identity as idn
from avatarv_jax.data.avatarworld import motion as mo
from avatarv_jax.data.avatarworld import render as rnd
from avatarv_jax.data.avatarworld import scene as scn
from avatarv_jax.data.avatarworld import speech


@dataclasses.dataclass
class Clip:
    """Everything about one clip. Arrays are numpy; audio is 16 kHz mono, video 25 fps."""

    frames: np.ndarray                 # uint8 [T, H, W, 3]
    motion: np.ndarray                 # float32 [T, MOTION_DIM], see motion.MOTION_FIELDS
    masks: dict[str, np.ndarray]       # "face", "mouth", "eyes": bool [T, H, W]
    audio: np.ndarray                  # float32 [T * 640]
    identity_id: int
    static_attributes: np.ndarray      # int32 [NUM_ATTRIBUTES], see identity.STATIC_ATTRIBUTES
    dynamic_style: np.ndarray          # float32 [DYNAMIC_STYLE_DIM] in [0, 1]
    scene_id: int
    caption: str
    language: str
    transcript: str
    seed: int
    speech_backend: str

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def resolution(self) -> int:
        return int(self.frames.shape[1])

    @property
    def split(self) -> str:
        """``heldout`` if the identity or the scene is held out, else ``train``."""
        held = "heldout" in (idn.split_of(self.identity_id), idn.split_of(self.scene_id))
        return "heldout" if held else "train"


def frames_for_vae(duration_s: float) -> int:
    """The nearest frame count of the form 1 + 4k for a duration (at least 1)."""
    k = max(0, round((duration_s * speech.FPS - 1) / 4))
    return 1 + 4 * k


def make_clip(seed: int, identity_id: int, scene_id: int, language: str = "en",
              duration_s: float = 2.0, resolution: int = 128, *, num_frames: int | None = None,
              dynamic_style: np.ndarray | None = None, speech_backend: str = "auto") -> Clip:
    """Render a clip; identical arguments give identical bytes.

    ``dynamic_style`` replaces the person's own style (to build style-swapped clips for metric
    tests); ``num_frames`` overrides ``duration_s``. ``speech_backend`` is ``auto`` (espeak-ng if
    installed, else the built-in synthetic voice), ``espeak-ng`` or ``synthetic``.
    """
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    t_frames = int(num_frames) if num_frames is not None else int(round(duration_s * speech.FPS))
    if t_frames < 1:
        raise ValueError(f"a clip needs at least one frame, got {t_frames}")
    person = idn.sample_identity(identity_id)
    place = scn.sample_scene(scene_id)
    style = person.style if dynamic_style is None else np.asarray(dynamic_style, np.float32)
    idn.style_to_physical(style)  # validates the shape
    rng = idn.rng_for("clip", seed, identity_id, scene_id)
    said = speech.make_speech(rng, t_frames * speech.SAMPLES_PER_FRAME, language,
                              person.voice.variant, person.voice.pitch, person.voice.speed,
                              backend=speech_backend)
    motion = mo.motion_from_audio(said.audio, style, rng, t_frames)
    out = rnd.render(person, place, motion, resolution)
    return Clip(frames=out.frames, motion=motion, masks=out.masks, audio=said.audio,
                identity_id=int(identity_id), static_attributes=person.attributes.copy(),
                dynamic_style=style.copy(), scene_id=int(scene_id), caption=place.caption(),
                language=language, transcript=said.transcript, seed=int(seed),
                speech_backend=said.backend)
