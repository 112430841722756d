"""``--manifest FILE.jsonl``: many jobs on one set of loaded, compiled models.

One JSON object per line with the fields of ``pipeline.Job`` (``reference``, ``output``,
``audio`` or ``text``, and optionally ``language``, ``voice``, ``prompt``,
``motion_reference``, ``seed``, ``steps``, ``guidance_audio``, ``guidance_text``,
``resolution``); blank lines and lines starting with ``#`` are skipped. Relative paths are
relative to the manifest's folder. Fields missing from a line take the command line's values.
Every job runs even when another fails; each one's result is one JSON line.
"""

from __future__ import annotations

import json
import time
import traceback
from pathlib import Path

from avatarv_jax.inference.errors import InferenceInputError
from avatarv_jax.inference.pipeline import Job, Pipeline

PATH_FIELDS = ("reference", "output", "audio", "motion_reference")


def read_manifest(path, defaults: dict | None = None) -> list[Job]:
    """The jobs of a manifest; a malformed line raises ``InferenceInputError`` naming it."""
    path = Path(path)
    if not path.is_file():
        raise InferenceInputError(f"manifest not found: {path}")
    jobs = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        try:
            values = json.loads(line)
        except json.JSONDecodeError as e:
            raise InferenceInputError(f"{path}:{number}: not JSON ({e})") from None
        if not isinstance(values, dict):
            raise InferenceInputError(f"{path}:{number}: expected a JSON object")
        for name in PATH_FIELDS:
            if values.get(name) is not None:
                values[name] = str(path.parent / values[name])
        merged = dict(defaults or {})
        if "audio" in values or "text" in values:      # a line's source replaces the default's
            merged.pop("audio", None)
            merged.pop("text", None)
        merged.update(values)
        try:
            jobs.append(Job.from_json(merged))
        except InferenceInputError as e:
            raise InferenceInputError(f"{path}:{number}: {e}") from None
    if not jobs:
        raise InferenceInputError(f"manifest {path} holds no jobs")
    return jobs


def run_jobs(pipeline: Pipeline, jobs: list[Job], *, progress: bool = True, log=print
             ) -> list[dict]:
    """Run every job; returns one result per job (``ok``, ``output`` or ``error``, seconds)."""
    results = []
    for index, job in enumerate(jobs):
        t0 = time.perf_counter()
        result = {"job": index, "output": job.output}
        try:
            record = pipeline.run(job, progress=progress)
            result.update(ok=True, frames=record["output"]["frames"])
        except InferenceInputError as e:
            result.update(ok=False, error=str(e), bad_input=True)
        except Exception as e:  # noqa: BLE001 - one failing job must not stop the others
            result.update(ok=False, error=f"{type(e).__name__}: {e}", bad_input=False)
            log(traceback.format_exc())
        result["seconds"] = round(time.perf_counter() - t0, 3)
        log(json.dumps(result))
        results.append(result)
    return results
