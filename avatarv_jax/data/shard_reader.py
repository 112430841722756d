"""Random access to the records of a finished shard set (a directory with ``manifest.json``).

AvatarWorld and real-video ingestion write the same layout: ArrayRecord shards with
``group_size:1`` (so any record can be read alone) listed, with their record counts, in a
manifest written last. Both data sets read it back through this class; the Grain pipelines read
the same shards through Grain's own ArrayRecord source.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import numpy as np

MANIFEST = "manifest.json"


def array_record_module():
    """The ``array_record`` extension, with an install hint when it is missing."""
    try:
        from array_record.python import array_record_module as module
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("shards need the `array-record` package (pip install array-record)") from e
    return module


def read_manifest(directory: str, what: str) -> dict[str, Any]:
    """The manifest of ``directory``; ``what`` names the data set kind in the error."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{directory} is not {what}: no {MANIFEST}")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class ShardedRecords:
    """``len(ds)``, ``ds.raw(i) -> bytes`` over every shard of a manifest, checked on open.

    ``check(manifest, manifest_path)`` raises when the manifest is of another kind or version.
    """

    def __init__(self, directory: str, what: str,
                 check: Callable[[dict[str, Any], str], None] | None = None):
        self.manifest = read_manifest(directory, what)
        if check is not None:
            check(self.manifest, os.path.join(directory, MANIFEST))
        self.directory = directory
        self._offsets = [0]
        self._readers: list[Any] = []
        ar = array_record_module()
        for shard in self.manifest["shards"]:
            file = os.path.join(directory, shard["path"])
            if not os.path.isfile(file):
                raise FileNotFoundError(f"shard {file} named in the manifest is missing")
            reader = ar.ArrayRecordReader(file)
            if reader.num_records() != shard["num_records"]:
                raise ValueError(f"shard {file} holds {reader.num_records()} records, "
                                 f"the manifest says {shard['num_records']}")
            self._readers.append(reader)
            self._offsets.append(self._offsets[-1] + shard["num_records"])

    def __len__(self) -> int:
        return self._offsets[-1]

    def raw(self, index: int) -> bytes:
        """The bytes of record ``index`` (negative indices count from the end)."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} out of range for {len(self)} records")
        index %= len(self)
        shard = int(np.searchsorted(self._offsets, index, side="right") - 1)
        return self._readers[shard].read([index - self._offsets[shard]])[0]

    def close(self) -> None:
        for r in self._readers:
            r.close()
        self._readers = []
