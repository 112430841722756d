"""Scene and outfit: background, clothing, lighting and framing, with the caption that says so.

A scene is a pure function of its scene id and never looks at the identity, so a person can be
rendered in any scene (and the model's text condition is about the scene, not the person).
"""

from __future__ import annotations

import dataclasses


from avatarv_jax.data.avatarworld.identity import rng_for

# name -> RGB in [0, 1]
BACKGROUND_COLORS: dict[str, tuple[float, float, float]] = {
    "beige": (0.86, 0.80, 0.68), "sky blue": (0.55, 0.75, 0.92), "sage green": (0.62, 0.74, 0.58),
    "lavender": (0.74, 0.68, 0.88), "coral": (0.95, 0.55, 0.45), "slate grey": (0.42, 0.47, 0.52),
    "navy": (0.14, 0.20, 0.40), "cream": (0.97, 0.95, 0.86),
}
BACKGROUND_KINDS: tuple[str, ...] = ("plain wall", "gradient wall", "striped wall", "dotted wall",
                                     "checkered wall", "room with a window")
CLOTHING_COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.78, 0.12, 0.14), "orange": (0.95, 0.50, 0.12), "yellow": (0.95, 0.84, 0.25),
    "green": (0.18, 0.55, 0.25), "teal": (0.10, 0.55, 0.55), "blue": (0.15, 0.30, 0.75),
    "purple": (0.45, 0.22, 0.60), "white": (0.94, 0.94, 0.94), "black": (0.10, 0.10, 0.12),
    "grey": (0.55, 0.55, 0.58),
}
CLOTHING_KINDS: tuple[str, ...] = ("t-shirt", "collared shirt", "suit", "hoodie", "turtleneck")
LIGHT_DIRECTIONS: dict[str, tuple[float, float]] = {
    "left": (-1.0, 0.0), "right": (1.0, 0.0), "above": (0.0, -1.0), "front": (0.0, 0.0)}
LIGHT_TINTS: dict[str, tuple[float, float, float]] = {
    "warm": (1.06, 1.0, 0.90), "neutral": (1.0, 1.0, 1.0), "cool": (0.92, 0.98, 1.08)}
FRAMINGS: dict[str, float] = {"close-up": 0.56, "medium": 0.47}   # face half-height (image = 2)
POSITIONS: dict[str, float] = {"left": -0.14, "centre": 0.0, "right": 0.14}


def _a(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


@dataclasses.dataclass(frozen=True)
class Scene:
    """Everything around the person. Colours are RGB in [0, 1]."""

    scene_id: int
    background_kind: str
    background_color: str
    background_color2: str
    clothing_kind: str
    clothing_color: str
    light_direction: str
    light_tint: str
    framing: str
    position: str

    @property
    def head_scale(self) -> float:
        return FRAMINGS[self.framing]

    @property
    def head_x(self) -> float:
        return POSITIONS[self.position]

    def caption(self) -> str:
        """The text condition: a sentence about the scene and outfit (never the person)."""
        wall = self.background_kind
        if wall == "room with a window":
            where = f"in {_a(self.background_color)} room with a window"
        elif wall in ("plain wall", "gradient wall"):
            where = f"in front of {_a(self.background_color)} {wall}"
        else:
            where = (f"in front of {_a(self.background_color)} and {self.background_color2} "
                     f"{wall}")
        light = "soft front light" if self.light_direction == "front" else (
            f"light from the {self.light_direction}")
        return (f"A {self.framing} shot of a person wearing {_a(self.clothing_color)} "
                f"{self.clothing_kind}, {where}, {self.light_tint} {light}, framed "
                f"{'in the centre' if self.position == 'centre' else 'on the ' + self.position}.")


def sample_scene(scene_id: int) -> Scene:
    """The scene with this id (background, outfit, light and framing drawn independently)."""
    rng = rng_for("scene", scene_id)
    pick = lambda options: options[int(rng.integers(len(options)))]
    bg = list(BACKGROUND_COLORS)
    c1 = pick(bg)
    c2 = pick([c for c in bg if c != c1])
    return Scene(scene_id=int(scene_id), background_kind=pick(BACKGROUND_KINDS),
                 background_color=c1, background_color2=c2,
                 clothing_kind=pick(CLOTHING_KINDS), clothing_color=pick(list(CLOTHING_COLORS)),
                 light_direction=pick(list(LIGHT_DIRECTIONS)), light_tint=pick(list(LIGHT_TINTS)),
                 framing=pick(list(FRAMINGS)), position=pick(list(POSITIONS)))
