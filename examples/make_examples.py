"""Regenerate the bundled example that ``python infer.py`` renders with no arguments.

    python examples/make_examples.py            # writes examples/reference.mp4 (+ .motion.npz)
                                                # and examples/speech.wav

- ``reference.mp4``: an AvatarWorld clip (identity 3, scene 1, 1.0 s, 64 x 64, 25 fps, with
  the person's own speech), H.264 + AAC.
- ``reference.motion.npz``: its exact per-frame motion vectors (``motion`` [25, 10]), which
  inference picks up as the reference motion (``avatarv_jax.inference.motion_source``).
- ``speech.wav``: 3.0 s of the same person speaking other sentences (espeak-ng), 16 kHz mono
  16-bit, the driving audio.

The clip and speech are deterministic functions of the seeds below (AvatarWorld renders
identical bytes for identical arguments); espeak-ng must be installed for the real voice.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from avatarv_jax.data.avatarworld import identity, speech
from avatarv_jax.data.avatarworld.clip import make_clip
from avatarv_jax.data.avatarworld.media import write_mp4

IDENTITY, SCENE, SEED = 3, 1, 7
REFERENCE_S, SPEECH_S, RESOLUTION = 1.0, 3.0, 64


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    clip = make_clip(SEED, IDENTITY, SCENE, duration_s=REFERENCE_S, resolution=RESOLUTION,
                     speech_backend="espeak-ng")
    write_mp4(str(out / "reference.mp4"), clip.frames, clip.audio)
    tmp = out / ".reference.motion.partial.npz"
    np.savez_compressed(tmp, motion=clip.motion.astype(np.float32))
    os.replace(tmp, out / "reference.motion.npz")

    person = identity.sample_identity(IDENTITY)
    rng = identity.rng_for("example-speech", SEED, IDENTITY)
    said = speech.make_speech(rng, int(SPEECH_S * speech.SAMPLE_RATE), "en", person.voice.variant,
                              person.voice.pitch, person.voice.speed, backend="espeak-ng")
    import soundfile as sf

    tmp = out / ".speech.partial.wav"
    sf.write(tmp, said.audio, speech.SAMPLE_RATE, subtype="PCM_16", format="WAV")
    os.replace(tmp, out / "speech.wav")
    print(f"wrote {out}/reference.mp4 ({clip.num_frames} frames, {clip.caption!r}), "
          f"reference.motion.npz, speech.wav ({SPEECH_S} s: {said.transcript!r})")


if __name__ == "__main__":
    main()
