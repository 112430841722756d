"""Where the reference's motion vectors come from: a pluggable extractor.

A motion extractor is any callable ``(frames uint8 [T, H, W, 3], path) -> float32 [T, M]``
(one motion vector per 25 fps frame, ``M`` the config's ``motion_dim``). Sources, in order:

1. an extractor passed to ``generate`` (or registered by name with ``register_extractor``,
   e.g. a landmark extractor for real video);
2. a sidecar file next to the video, ``<name>.motion.npz`` with an array ``motion`` [T, M]
   (AvatarWorld renders carry their exact motion this way; loaded with
   ``allow_pickle=False``).

When none applies, or the vectors do not fit, the reference runs with zero motion: the
pipeline never fails for lack of motion, and the reason is logged and kept in the sidecar JSON.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Callable

import numpy as np

MotionExtractor = Callable[[np.ndarray, Path], np.ndarray]

_EXTRACTORS: dict[str, MotionExtractor] = {}


def register_extractor(name: str, extractor: MotionExtractor) -> None:
    """Make ``extractor`` available as ``motion_extractor=name``."""
    _EXTRACTORS[name] = extractor


def registered_extractors() -> tuple[str, ...]:
    return tuple(sorted(_EXTRACTORS))


def sidecar_path(video: Path) -> Path:
    return Path(video).with_suffix(".motion.npz")


@dataclasses.dataclass(frozen=True)
class ReferenceMotion:
    """Motion vectors [T, M] for the reference frames, and where they came from."""

    motion: np.ndarray
    source: str          # "extractor:<name>", "sidecar:<path>" or "none"
    note: str = ""       # why the motion is zero, when it is

    @property
    def available(self) -> bool:
        return self.source != "none"


def _sidecar(video: Path) -> np.ndarray | None:
    path = sidecar_path(video)
    if not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as data:
        if "motion" not in data:
            raise ValueError(f"{path} holds no 'motion' array")
        return np.asarray(data["motion"], np.float32)


def reference_motion(frames: np.ndarray, video: Path, motion_dim: int,
                     extractor: MotionExtractor | str | None = "auto") -> ReferenceMotion:
    """Motion for ``frames`` (read from ``video``): see the module docstring for the order.

    ``extractor``: a callable, a registered name, ``"auto"`` (a registered extractor if exactly
    one is registered, else the sidecar) or ``None`` (zero motion).
    """
    t = frames.shape[0]
    zero = np.zeros((t, motion_dim), np.float32)
    if extractor is None:
        return ReferenceMotion(zero, "none", "motion extraction switched off")
    name, fn = None, None
    if callable(extractor):
        name, fn = getattr(extractor, "__name__", "custom"), extractor
    elif extractor != "auto":
        if extractor not in _EXTRACTORS:
            return ReferenceMotion(zero, "none", f"no motion extractor named {extractor!r} "
                                   f"(registered: {', '.join(registered_extractors()) or 'none'})")
        name, fn = extractor, _EXTRACTORS[extractor]
    elif len(_EXTRACTORS) == 1:
        name, fn = next(iter(_EXTRACTORS.items()))

    attempts = []
    if fn is not None:
        try:
            found, source = np.asarray(fn(frames, Path(video)), np.float32), f"extractor:{name}"
        except Exception as e:  # noqa: BLE001 - a failing extractor must not stop the run
            found, source = None, None
            attempts.append(f"extractor {name} failed: {e!r}")
    else:
        found, source = None, None
    if found is None:
        try:
            found = _sidecar(Path(video))
            source = f"sidecar:{sidecar_path(Path(video))}" if found is not None else None
        except (ValueError, OSError) as e:
            attempts.append(f"unreadable motion sidecar: {e}")
    if found is None:
        attempts.append(f"no motion extractor registered and no {sidecar_path(Path(video)).name}")
        return ReferenceMotion(zero, "none", "; ".join(attempts))
    if found.ndim != 2 or found.shape[1] != motion_dim or found.shape[0] < t:
        return ReferenceMotion(zero, "none", f"{source} gave motion of shape {found.shape}; "
                               f"expected at least [{t}, {motion_dim}]")
    if not np.all(np.isfinite(found[:t])):
        return ReferenceMotion(zero, "none", f"{source} gave non-finite motion values")
    return ReferenceMotion(np.ascontiguousarray(found[:t]), source)
