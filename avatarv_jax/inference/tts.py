"""``--text``: speech from espeak-ng (the same wrapper AvatarWorld uses), at 16 kHz.

``language`` is one of AvatarWorld's codes (en, de, es, fr, zh, hi) or any espeak-ng voice
name (``espeak-ng --voices``); ``voice`` is an espeak-ng variant (``m3``, ``f2``, ...; see
``espeak-ng --voices=variant``).
"""

from __future__ import annotations

import functools
import shutil
import subprocess

import numpy as np

from avatarv_jax.data.avatarworld import speech
from avatarv_jax.inference.errors import InferenceInputError

DEFAULT_VARIANT = "m3"
PAUSE_S = 0.2          # silence before and after the sentence


@functools.cache
def _espeak_list(kind: str) -> frozenset[str]:
    """Voice names espeak-ng knows (``kind`` "" for languages, "variant" for variants)."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        return frozenset()
    arg = "--voices=variant" if kind else "--voices"
    out = subprocess.run([exe, arg], capture_output=True, text=True, check=False).stdout
    names = set()
    for line in out.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 5:
            names.add(fields[1].lower())                       # language code
            names.add(fields[4].split("/")[-1].lower())         # file name
    return frozenset(names)


def resolve_voice(language: str, voice: str | None) -> tuple[str, str]:
    """(espeak-ng voice, variant) for ``language`` and ``voice``, or a clear error."""
    if shutil.which("espeak-ng") is None:
        raise InferenceInputError("--text needs espeak-ng (Debian: apt-get install espeak-ng); "
                                  "or pass an audio file with --audio")
    lang = (language or "").strip()
    if lang in speech.LANGUAGES:
        espeak_voice = speech.LANGUAGES[lang][0]
    elif lang.lower() in _espeak_list(""):
        espeak_voice = lang
    else:
        raise InferenceInputError(f"unknown language {language!r}; use one of "
                                  f"{', '.join(speech.LANGUAGE_CODES)} or an espeak-ng voice "
                                  f"(espeak-ng --voices)")
    variant = (voice or DEFAULT_VARIANT).strip()
    if variant.lower() not in _espeak_list("variant"):
        raise InferenceInputError(f"unknown voice {voice!r}; use an espeak-ng variant such as "
                                  f"m1..m7, f1..f5 (espeak-ng --voices=variant)")
    return espeak_voice, variant


def synthesize(text: str, language: str = "en", voice: str | None = None, *,
               pitch: int = 50, speed: int = 160) -> np.ndarray:
    """float32 [N] at 16 kHz: the sentence, peak 0.5, with short pauses around it."""
    if not text or not text.strip():
        raise InferenceInputError("--text is empty")
    espeak_voice, variant = resolve_voice(language, voice)
    try:
        wave = speech.espeak_utterance(text.strip(), espeak_voice, variant, pitch, speed)
    except speech.SpeechBackendError as e:
        raise InferenceInputError(f"espeak-ng could not speak the text: {e}") from None
    if wave.size == 0:
        raise InferenceInputError(f"espeak-ng produced no sound for {text!r} in {language!r}")
    wave = wave * (speech.SPEECH_PEAK / max(float(np.abs(wave).max()), 1e-9))
    pad = np.zeros(int(PAUSE_S * speech.SAMPLE_RATE), np.float32)
    return np.concatenate([pad, wave.astype(np.float32), pad])
