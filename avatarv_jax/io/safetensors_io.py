"""Read checkpoints from safetensors only: a file, a sharded index, or a diffusers directory.

safetensors holds raw arrays and a JSON header, so reading one cannot run code. Pickle-based
files (``.bin``, ``.pt``, ``.pth``, ``.ckpt``) can, and are refused with an error that says
so; convert them once with the tool that made them, in an environment you trust.

Tensors are read lazily, one at a time, as numpy arrays (bf16 as ``ml_dtypes.bfloat16``), so
a large checkpoint never has to sit in memory whole.
"""

from __future__ import annotations

import json
from pathlib import Path
from collections.abc import Iterator

import numpy as np
from safetensors import safe_open

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# diffusers saves models as diffusion_pytorch_model*, transformers as model*.
PREFERRED_STEMS = ("diffusion_pytorch_model", "model")


class UnsupportedCheckpointError(ValueError):
    """The path holds no safetensors weights we can read (or only pickle-based ones)."""


def _pickle_error(files: list[Path]) -> UnsupportedCheckpointError:
    names = ", ".join(str(f) for f in files)
    return UnsupportedCheckpointError(
        f"{names}: pickle-based checkpoint formats can run arbitrary code when loaded and are "
        f"not supported. Use a safetensors release of these weights, or convert them once "
        f"(load with the original code, save with safetensors) in an environment you trust.")


def _pick_one(candidates: list[Path], what: str, directory: Path) -> Path:
    if len(candidates) == 1:
        return candidates[0]
    for stem in PREFERRED_STEMS:
        for c in candidates:
            if c.name.startswith(stem + "."):
                return c
    names = ", ".join(sorted(c.name for c in candidates))
    raise UnsupportedCheckpointError(
        f"{directory} holds several {what} ({names}) and none is the standard "
        f"{PREFERRED_STEMS[0]}/{PREFERRED_STEMS[1]} name: pass the file to use")


def resolve_weight_files(path: str | Path) -> tuple[dict[str, Path] | None, list[Path]]:
    """``(weight_map, files)`` for ``path``: ``weight_map`` is the index's name -> shard map
    (``None`` for a single file); ``files`` are the safetensors files to read."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    if path.is_dir():
        indexes = sorted(path.glob("*.safetensors.index.json"))
        singles = sorted(path.glob("*.safetensors"))
        if indexes:
            path = _pick_one(indexes, "safetensors indexes", path)
        elif singles:
            path = _pick_one(singles, "safetensors files", path)
        else:
            pickles = sorted(p for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise _pickle_error(pickles)
            raise UnsupportedCheckpointError(f"no *.safetensors or *.safetensors.index.json "
                                             f"file in {path}")
    name = path.name
    if name.endswith(".safetensors.index.json"):
        return _read_index(path)
    if name.endswith(".safetensors"):
        return None, [path]
    if path.suffix in PICKLE_SUFFIXES:
        raise _pickle_error([path])
    raise UnsupportedCheckpointError(f"{path} is not a .safetensors file, a "
                                     f".safetensors.index.json index or a directory")


def locate_checkpoint(path: str | Path, subfolder: str | None = None
                      ) -> tuple[Path, Path | None]:
    """(weights path, its config.json or None).

    A pipeline root (a folder without config.json that has ``subfolder``, e.g. ``vae`` or
    ``transformer``) resolves to that subfolder; a file's config.json is looked for beside it.
    """
    path = Path(path)
    if path.is_dir():
        if subfolder and (path / subfolder).is_dir() and not (path / "config.json").is_file():
            path = path / subfolder
        config = path / "config.json"
    else:
        config = path.parent / "config.json"
    return path, (config if config.is_file() else None)


def _read_index(index: Path) -> tuple[dict[str, Path], list[Path]]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise UnsupportedCheckpointError(f"{index} is not a safetensors index (a JSON object "
                                         f"with a 'weight_map'): {e}") from None
    shards = {name: index.parent / shard for name, shard in weight_map.items()}
    files = sorted(set(shards.values()))
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise FileNotFoundError(f"{index} lists shards that do not exist: {', '.join(absent)}")
    return shards, files


class SafetensorsCheckpoint:
    """Read-only, lazy view of the tensors of one safetensors checkpoint."""

    def __init__(self, path: str | Path):
        weight_map, files = resolve_weight_files(path)
        self.source = str(path)
        self._file: dict[str, Path] = {}
        self._shape: dict[str, tuple[int, ...]] = {}
        self._dtype: dict[str, str] = {}
        for f in files:
            with safe_open(str(f), framework="numpy") as handle:
                for name in handle.keys():
                    if weight_map is not None and weight_map.get(name) != f:
                        continue  # the index is the authority on which shard holds a tensor
                    if name in self._file:
                        raise UnsupportedCheckpointError(
                            f"tensor {name!r} is in both {self._file[name]} and {f}")
                    piece = handle.get_slice(name)
                    self._file[name] = f
                    self._shape[name] = tuple(piece.get_shape())
                    self._dtype[name] = str(piece.get_dtype())
        if weight_map is not None:
            lost = sorted(set(weight_map) - set(self._file))
            if lost:
                raise UnsupportedCheckpointError(
                    f"{path} lists tensors its shards do not hold: {', '.join(lost[:20])}"
                    + (f" and {len(lost) - 20} more" if len(lost) > 20 else ""))

    def keys(self) -> list[str]:
        return sorted(self._file)

    def __contains__(self, name: str) -> bool:
        return name in self._file

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._file)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shape)

    def dtype(self, name: str) -> str:
        """The stored dtype as safetensors names it (``F32``, ``BF16``, ...)."""
        return self._dtype[name]

    def get(self, name: str) -> np.ndarray:
        if name not in self._file:
            raise KeyError(f"no tensor {name!r} in {self.source}")
        with safe_open(str(self._file[name]), framework="numpy") as handle:
            return handle.get_tensor(name)


def load_safetensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint, as numpy arrays (small checkpoints and tests)."""
    ckpt = SafetensorsCheckpoint(path)
    return {name: ckpt.get(name) for name in ckpt.keys()}
