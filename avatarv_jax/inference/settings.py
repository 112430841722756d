"""The inference section of a config, with defaults for configs that lack one.

The fields (``cfg.inference.<field>``):

- ``chunk_latents``: GEN latent frames per chunk, prefix included (6: 21 video frames first).
- ``prefix_latents``: clean latents carried from one chunk to the next (temporal continuity).
- ``anchor_latents``: latents of the first chunk appended to REF as global anchors for every
  later chunk (against drift); 0 switches anchors off.
- ``ref_frames``: reference video frames used (``1 + 4r``); ``min_ref_frames`` the fewest
  accepted.
- ``audio_context_frames``: audio the encoder sees either side of a chunk (25 fps frames), so
  features at chunk edges do not depend on where the cut falls.
- ``max_text_length``: text tokens (fixed: one compiled text encoder for every prompt).
- ``resolution``: default output ``[H, W]`` (multiples of 16; of 32 with the SR refiner).
- ``sr_scale``, ``sr_steps``: SR refiner upscale factor and sampling steps (distilled: 1).
- ``default_prompt``: the scene prompt when none is given.
"""

from __future__ import annotations

import dataclasses

from avatarv_jax.inference.errors import InferenceInputError

LATENT_STRIDE = 16        # VAE spatial stride 8 x DiT patch 2


@dataclasses.dataclass(frozen=True)
class InferenceSettings:
    chunk_latents: int = 6
    prefix_latents: int = 1
    anchor_latents: int = 1
    ref_frames: int = 17
    min_ref_frames: int = 5
    audio_context_frames: int = 50
    max_text_length: int = 256
    resolution: tuple[int, int] = (480, 832)
    sr_scale: int = 2
    sr_steps: int = 1
    default_prompt: str = "a person talking to the camera"

    def __post_init__(self):
        if self.chunk_latents < 2:
            raise ValueError(f"inference.chunk_latents must be >= 2, got {self.chunk_latents}")
        if not 0 <= self.prefix_latents < self.chunk_latents:
            raise ValueError(f"inference.prefix_latents must be in [0, chunk_latents), got "
                             f"{self.prefix_latents}")
        if not 0 <= self.anchor_latents < self.chunk_latents:
            raise ValueError(f"inference.anchor_latents must be in [0, chunk_latents), got "
                             f"{self.anchor_latents}")
        for name in ("ref_frames", "min_ref_frames"):
            value = getattr(self, name)
            if value < 1 or (value - 1) % 4:
                raise ValueError(f"inference.{name} must be 1 + 4k, got {value}")
        if self.min_ref_frames > self.ref_frames:
            raise ValueError("inference.min_ref_frames must not exceed ref_frames")
        object.__setattr__(self, "resolution", tuple(int(v) for v in self.resolution))

    @classmethod
    def from_config(cls, cfg) -> "InferenceSettings":
        """``cfg.inference`` over the defaults (tiny models default to 64 x 64)."""
        values = {}
        if str(cfg.get("name", "")).startswith("tiny"):
            values["resolution"] = (64, 64)
        section = cfg.get("inference", None)
        if section is not None:
            known = {f.name for f in dataclasses.fields(cls)}
            unknown = set(section) - known
            if unknown:
                raise ValueError(f"unknown inference config fields: {sorted(unknown)}")
            values.update(dict(section))
        return cls(**values)


def parse_resolution(value, *, multiple: int = LATENT_STRIDE) -> tuple[int, int]:
    """``64``, ``"64"``, ``"480x832"`` or ``(480, 832)`` -> (H, W), checked against ``multiple``."""
    try:
        if isinstance(value, str):
            parts = value.lower().replace("*", "x").split("x")
            hw = (int(parts[0]),) * 2 if len(parts) == 1 else tuple(int(p) for p in parts)
        elif isinstance(value, int):
            hw = (value, value)
        else:
            hw = tuple(int(v) for v in value)
    except (TypeError, ValueError):
        raise InferenceInputError(f"resolution {value!r}: expected N or HxW") from None
    if len(hw) != 2 or min(hw) <= 0 or hw[0] % multiple or hw[1] % multiple:
        raise InferenceInputError(f"resolution {value!r} is not a multiple of {multiple}: "
                                  f"height and width must be positive multiples of {multiple}")
    return hw
