"""Generate a talking-avatar video: a reference clip + audio (or text) -> mp4 of the audio's length.

    python infer.py                                   # the bundled example (examples/)
    python infer.py --reference me.mp4 --audio speech.mp3 --output out.mp4
    python infer.py --reference me.mp4 --text "Hello there" --language en --voice f2 \\
        --prompt "a person in a bright office" --output out.mp4
    python infer.py --manifest jobs.jsonl             # many jobs, one model load

Weights: ``--checkpoint`` (a trainer work/step directory, or a converted checkpoint), else
``checkpoints/demo/`` when it exists, else random weights (the output is noise). Bad input
exits with status 2 and leaves no output file. See docs/inference.md.
"""

import json
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

from avatarv_jax.inference import InferenceInputError, Job, Pipeline
from avatarv_jax.inference.manifest import read_manifest, run_jobs
from avatarv_jax.inference.pipeline import prepare, resolve_config

EXAMPLES = Path(__file__).resolve().parent / "examples"

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "model config file (default: the checkpoint's config.json, else "
    "configs/tiny.py)", lock_config=False)
_REFERENCE = flags.DEFINE_string("reference", None, "reference video of the person")
_AUDIO = flags.DEFINE_string("audio", None, "driving audio file (any format FFmpeg reads)")
_TEXT = flags.DEFINE_string("text", None, "text to speak (espeak-ng) instead of --audio")
_LANGUAGE = flags.DEFINE_string("language", "en", "language of --text (en, de, es, fr, zh, hi "
                                "or an espeak-ng voice)")
_VOICE = flags.DEFINE_string("voice", None, "espeak-ng voice variant for --text (m1..m7, f1..f5)")
_PROMPT = flags.DEFINE_string("prompt", None, "scene prompt")
_MOTION_REF = flags.DEFINE_string("motion_reference", None,
                                  "another clip of the same person whose motion style to use")
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "trainer or converted checkpoint")
_SR_CHECKPOINT = flags.DEFINE_string("sr_checkpoint", None, "checkpoint of the SR refiner")
_STEPS = flags.DEFINE_integer("steps", None, "sampling steps (default: the config's)")
_GUIDANCE_AUDIO = flags.DEFINE_float("guidance_audio", None, "audio guidance scale")
_GUIDANCE_TEXT = flags.DEFINE_float("guidance_text", None, "text/reference guidance scale")
_RESOLUTION = flags.DEFINE_string("resolution", None, "output size: N or HxW (multiples of 16)")
_SEED = flags.DEFINE_integer("seed", 0, "random seed of the sampling noise")
_SR = flags.DEFINE_boolean("sr", False, "run the SR refiner (--sr / --no-sr)")
_OUTPUT = flags.DEFINE_string("output", "output.mp4", "output mp4 (a JSON sidecar is written "
                              "next to it)")
_MANIFEST = flags.DEFINE_string("manifest", None, "JSONL file of jobs (fields as the flags)")
_PROGRESS = flags.DEFINE_boolean("progress", True, "show the progress bar")

BAD_INPUT = 2


def _log(message: str) -> None:
    """Messages go to stderr; stdout carries only the manifest's JSON results."""
    print(message, file=sys.stderr)


def _job_defaults() -> dict:
    text = _TEXT.value
    audio = _AUDIO.value
    reference = _REFERENCE.value
    if reference is None and audio is None and text is None and not _MANIFEST.value:
        reference, audio = str(EXAMPLES / "reference.mp4"), str(EXAMPLES / "speech.wav")
    return {"reference": reference, "audio": audio, "text": text, "language": _LANGUAGE.value,
            "voice": _VOICE.value, "prompt": _PROMPT.value,
            "motion_reference": _MOTION_REF.value, "seed": _SEED.value, "steps": _STEPS.value,
            "guidance_audio": _GUIDANCE_AUDIO.value, "guidance_text": _GUIDANCE_TEXT.value,
            "resolution": _RESOLUTION.value, "output": _OUTPUT.value}


def main(argv):
    if not flags.FLAGS["verbosity"].present:     # Orbax and JAX log every load at INFO
        logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}", exitcode=BAD_INPUT)
    try:
        defaults = _job_defaults()
        if _MANIFEST.value:
            jobs = read_manifest(_MANIFEST.value, {k: v for k, v in defaults.items()
                                                   if k not in ("reference", "output")})
        else:
            if defaults["reference"] is None:
                raise InferenceInputError("--reference is required (or no arguments at all "
                                          "for the bundled example)")
            jobs = [Job(**defaults)]
        config = resolve_config(_CONFIG.value, _CHECKPOINT.value)
        first = None
        if not _MANIFEST.value:        # check the inputs before the (slow) model load
            first = prepare(jobs[0], config, sr=_SR.value, log=_log)
        pipeline = Pipeline.load(config, _CHECKPOINT.value, sr=_SR.value,
                                 sr_checkpoint=_SR_CHECKPOINT.value, log=_log)
        if first is not None:
            pipeline.run(first, progress=_PROGRESS.value)
            return 0
    except InferenceInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return BAD_INPUT
    results = run_jobs(pipeline, jobs, progress=_PROGRESS.value, log=_log)
    for result in results:
        print(json.dumps(result))
    if all(r["ok"] for r in results):
        return 0
    return BAD_INPUT if all(r.get("bad_input") for r in results if not r["ok"]) else 1


_DASHED = {"--no-sr": "--nosr", "--motion-reference": "--motion_reference",
           "--guidance-audio": "--guidance_audio", "--guidance-text": "--guidance_text",
           "--sr-checkpoint": "--sr_checkpoint"}


def _parse_flags(argv):
    """absl flags, plus the dashed spellings (``--no-sr``...) and exit status 2 on a bad flag."""
    def canonical(arg):
        name, eq, value = arg.partition("=")
        return _DASHED.get(name, name) + eq + value

    try:
        return flags.FLAGS([argv[0]] + [canonical(a) for a in argv[1:]])
    except flags.Error as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(BAD_INPUT)


if __name__ == "__main__":
    app.run(main, flags_parser=_parse_flags)
