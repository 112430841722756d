"""Check a checkpoint's names and shapes against what a model expects, all at once.

Importers compare the full expected ``name -> shape`` table with the checkpoint before
converting anything, and fail with ONE error listing every missing key, unexpected key and
shape mismatch: fixing a wrong config one key per run is slow and hides the pattern.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

Shape = tuple[int, ...]


class CheckpointMismatchError(ValueError):
    """The checkpoint does not fit the model; ``missing``/``unexpected``/``mismatched`` list why."""

    def __init__(self, message: str, missing: dict, unexpected: dict, mismatched: dict):
        super().__init__(message)
        self.missing = missing
        self.unexpected = unexpected
        self.mismatched = mismatched


@dataclasses.dataclass(frozen=True)
class ImportReport:
    """What an importer loaded: keep it next to the model in logs."""

    source: str
    tensors: int
    parameters: int
    source_dtypes: dict[str, int]
    notes: tuple[str, ...] = ()

    def __str__(self) -> str:
        dtypes = ", ".join(f"{k}: {v}" for k, v in sorted(self.source_dtypes.items()))
        lines = [f"imported {self.tensors} tensors ({self.parameters:,} parameters) from "
                 f"{self.source} [{dtypes}]"]
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def check_names_and_shapes(expected: Mapping[str, Shape], found: Mapping[str, Shape], *,
                           source: str, ignore: Iterable[str] = (), hint: str = "") -> None:
    """Raise ``CheckpointMismatchError`` listing every difference, or return ``None``.

    ``ignore`` names checkpoint keys that may be present without the model using them.
    """
    ignore = set(ignore)
    missing = {k: tuple(v) for k, v in expected.items() if k not in found}
    unexpected = {k: tuple(v) for k, v in found.items() if k not in expected and k not in ignore}
    mismatched = {k: (tuple(v), tuple(found[k])) for k, v in expected.items()
                  if k in found and tuple(found[k]) != tuple(v)}
    if not (missing or unexpected or mismatched):
        return
    n = len(missing) + len(unexpected) + len(mismatched)
    lines = [f"checkpoint {source} does not match the model ({n} problem{'s' * (n != 1)}):"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}):")
        lines += [f"    {k}  expected shape {s}" for k, s in sorted(missing.items())]
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}):")
        lines += [f"    {k}  shape {s}" for k, s in sorted(unexpected.items())]
    if mismatched:
        lines.append(f"  shape mismatches ({len(mismatched)}):")
        lines += [f"    {k}  expected {e}, found {f}" for k, (e, f) in sorted(mismatched.items())]
    if hint:
        lines.append(hint)
    raise CheckpointMismatchError("\n".join(lines), missing, unexpected, mismatched)


def check_config_agrees(cfg, file_values: Mapping[str, Any], config_file, importer: str) -> None:
    """One error listing every field where ``cfg`` differs from the checkpoint's config.json.

    ``file_values`` maps config field names to the values read from ``config_file``.
    """
    diffs = [f"{k}: given {getattr(cfg, k)!r}, {config_file} has {v!r}"
             for k, v in file_values.items() if getattr(cfg, k) != v]
    if diffs:
        raise ValueError(f"the config passed to {importer} disagrees with the checkpoint's "
                         "config.json:\n  " + "\n  ".join(diffs))
