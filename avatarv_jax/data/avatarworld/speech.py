"""Speech for AvatarWorld: espeak-ng sentences with pauses, and the mouth track of a waveform.

Audio is 16 kHz mono float32; video runs at 25 fps, so one video frame spans 640 samples.

``mouth_track`` is *the* documented function that ties the mouth to the sound. For video frame t
(centre sample c = (t + 0.5) * 640) it takes a 1024-sample Hann window around c and computes

    rms    = sqrt(sum(w x^2) / sum(w^2))
    gate   = rms >= SILENCE_RMS                                 (silent frames: mouth shut)
    loud   = clip((20 log10(rms) - SILENCE_DB) / LOUDNESS_RANGE_DB, 0, 1)
    low    = energy below 1 kHz / total energy                   (voiced vowel vs. fricative)
    bright = clip((spectral centroid - 500 Hz) / 2500 Hz, 0, 1)  (spread vs. rounded lips)
    open   = gate * smooth3(loud * (0.35 + 0.65 low))            smooth3 = [1/4, 1/2, 1/4]

so the track is exactly 0 on every frame whose window is silent, grows with loudness, and is
smaller for hiss-like sounds (s, f, sh) than for vowels. ``bright`` drives lip rounding.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import shutil
import subprocess

import numpy as np
from scipy import signal

SAMPLE_RATE = 16000
FPS = 25
SAMPLES_PER_FRAME = SAMPLE_RATE // FPS  # 640
WINDOW = 1024
SILENCE_RMS = 0.004                     # about -48 dBFS; speech is normalised to peak 0.5
SILENCE_DB = float(20 * np.log10(SILENCE_RMS))
LOUDNESS_RANGE_DB = 30.0
SPEECH_PEAK = 0.5

# language code -> (espeak-ng voice, sentences). Sentences are written for this project.
LANGUAGES: dict[str, tuple[str, tuple[str, ...]]] = {
    "en": ("en-us", (
        "Good morning, it is a bright and quiet day.",
        "I walk to the market every Saturday.",
        "Please open the window, the room is warm.",
        "We will meet again after the long weekend.",
        "My brother plays the piano after dinner.",
        "The train to the coast leaves at seven.",
    )),
    "de": ("de", (
        "Guten Morgen, heute ist ein schöner Tag.",
        "Ich trinke jeden Morgen eine Tasse Kaffee.",
        "Der Zug nach Berlin fährt um acht Uhr ab.",
        "Wir gehen am Sonntag im Wald spazieren.",
        "Meine Schwester liest gern alte Bücher.",
        "Bitte schließen Sie die Tür hinter sich.",
    )),
    "es": ("es", (
        "Buenos días, hoy hace un tiempo precioso.",
        "Mi madre prepara café todas las mañanas.",
        "El autobús llega a la plaza a las nueve.",
        "Vamos a la playa el próximo domingo.",
        "Mi amigo toca la guitarra por la noche.",
        "Por favor, cierra la puerta al salir.",
    )),
    "fr": ("fr-fr", (
        "Bonjour, il fait très beau aujourd'hui.",
        "Je prends le train pour Lyon demain matin.",
        "Nous mangeons souvent au petit café du coin.",
        "Ma sœur apprend à jouer du violon.",
        "Le marché ouvre tôt le samedi.",
        "Fermez la fenêtre, s'il vous plaît.",
    )),
    "zh": ("cmn-latn-pinyin", (
        "ni3 hao3, jin1 tian1 tian1 qi4 hen3 hao3.",
        "wo3 mei3 tian1 zao3 shang4 he1 cha2.",
        "zhe4 ben3 shu1 fei1 chang2 you3 qu4.",
        "wo3 men ming2 tian1 qu4 shang1 dian4.",
        "ta1 zai4 gong1 yuan2 li3 san4 bu4.",
        "xue2 sheng1 men zai4 jiao4 shi4 li3 du2 shu1.",
    )),
    "hi": ("hi", (
        "नमस्ते, आज मौसम बहुत अच्छा है।",
        "मैं हर सुबह पार्क में टहलता हूँ।",
        "यह किताब बहुत दिलचस्प है।",
        "हम कल बाज़ार जाएंगे।",
        "मुझे चाय पीना पसंद है।",
        "बच्चे बगीचे में खेल रहे हैं।",
    )),
}
LANGUAGE_CODES: tuple[str, ...] = tuple(LANGUAGES)


class SpeechBackendError(RuntimeError):
    """espeak-ng was asked for but cannot be used."""


@dataclasses.dataclass(frozen=True)
class Speech:
    """A clip's audio, its text and the sample spans that hold speech (the rest is pause)."""

    audio: np.ndarray                       # float32 [N] at SAMPLE_RATE
    transcript: str
    segments: tuple[tuple[int, int], ...]   # [start, end) sample spans of utterances
    backend: str                            # "espeak-ng" or "synthetic"


@functools.cache
def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


def espeak_utterance(text: str, voice: str, variant: str, pitch: int, speed: int) -> np.ndarray:
    """One utterance from espeak-ng at 16 kHz, trimmed of leading/trailing silence."""
    import soundfile as sf  # imported here so the renderer works without it

    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SpeechBackendError(
            "espeak-ng is not installed (Debian: apt-get install espeak-ng); "
            "use backend='synthetic' or 'auto' for the built-in voice")
    cmd = [exe, "-v", f"{voice}+{variant}", "-p", str(pitch), "-s", str(speed), "--stdout", text]
    proc = subprocess.run(cmd, capture_output=True, check=False, timeout=60)
    if proc.returncode != 0 or len(proc.stdout) < 64:
        raise SpeechBackendError(
            f"espeak-ng failed for voice {voice}+{variant}: {proc.stderr.decode(errors='replace')}")
    wav, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32")
    if wav.ndim == 2:
        wav = wav.mean(axis=1)
    g = np.gcd(SAMPLE_RATE, sr)
    wav = signal.resample_poly(wav, SAMPLE_RATE // g, sr // g).astype(np.float32)
    loud = np.flatnonzero(np.abs(wav) > 0.02 * max(float(np.abs(wav).max()), 1e-9))
    return wav[loud[0]:loud[-1] + 1] if loud.size else wav[:0]


def synthetic_utterance(rng: np.random.Generator, pitch: int, speed: int) -> np.ndarray:
    """A built-in babble voice (used when espeak-ng is missing): vowels through two formant
    resonators, with hiss consonants, so loudness and spectral shape vary like speech."""
    formants = ((800, 1200), (300, 2300), (350, 800), (500, 1900), (500, 900))
    f0 = 90.0 + 1.6 * pitch
    syll = int(SAMPLE_RATE * 60.0 / speed / 1.6)  # about 1.6 syllables per word
    out = []
    for _ in range(int(rng.integers(5, 12))):
        if rng.random() < 0.5:  # fricative onset
            n = int(0.06 * SAMPLE_RATE)
            hiss = signal.lfilter(*signal.butter(2, 3000, "highpass", fs=SAMPLE_RATE),
                                  rng.standard_normal(n)) * 0.25
            out.append(hiss * np.hanning(n))
        n = int(syll * rng.uniform(0.7, 1.3))
        t = np.arange(n) / SAMPLE_RATE
        pulses = signal.sawtooth(2 * np.pi * f0 * (1 + 0.08 * np.sin(2 * np.pi * 3 * t)) * t)
        f1, f2 = formants[rng.integers(len(formants))]
        voiced = np.zeros(n)
        for f, bw in ((f1, 90.0), (f2, 120.0)):
            r = np.exp(-np.pi * bw / SAMPLE_RATE)
            a = [1.0, -2 * r * np.cos(2 * np.pi * f / SAMPLE_RATE), r * r]
            voiced += signal.lfilter([1 - r], a, pulses)
        out.append(voiced * np.hanning(n) ** 0.5)
        if rng.random() < 0.3:
            out.append(np.zeros(int(0.05 * SAMPLE_RATE)))
    return np.concatenate(out).astype(np.float32)


def resolve_backend(backend: str) -> str:
    """``auto`` picks espeak-ng when installed and the synthetic voice otherwise."""
    if backend == "auto":
        return "espeak-ng" if espeak_available() else "synthetic"
    if backend not in ("espeak-ng", "synthetic"):
        raise ValueError(f"speech backend must be 'auto', 'espeak-ng' or 'synthetic', got {backend!r}")
    if backend == "espeak-ng" and not espeak_available():
        raise SpeechBackendError("espeak-ng is not installed (Debian: apt-get install espeak-ng)")
    return backend


def make_speech(rng: np.random.Generator, num_samples: int, language: str, variant: str,
                pitch: int, speed: int, backend: str = "auto") -> Speech:
    """Sentences separated by pauses (0.3-0.9 s, and a lead-in of 0.1-0.5 s), cut to length.

    The last utterance is cut with a 20 ms fade when it runs past the end.
    """
    if language not in LANGUAGES:
        raise ValueError(f"unknown language {language!r}; known: {', '.join(LANGUAGE_CODES)}")
    backend = resolve_backend(backend)
    voice, sentences = LANGUAGES[language]
    audio = np.zeros(num_samples, np.float32)
    pos = int(rng.uniform(0.1, 0.5) * SAMPLE_RATE)
    texts, segments = [], []
    order = rng.permutation(len(sentences))
    k = 0
    while pos < num_samples - SAMPLES_PER_FRAME:
        if backend == "espeak-ng":
            text = sentences[order[k % len(order)]]
            utt = espeak_utterance(text, voice, variant, pitch, speed)
        else:
            text = "<babble>"
            utt = synthetic_utterance(rng, pitch, speed)
        k += 1
        if utt.size == 0:
            if k > 4 * len(sentences):
                raise SpeechBackendError(f"espeak-ng produced no sound for language {language!r}")
            continue
        utt = utt * (SPEECH_PEAK / max(float(np.abs(utt).max()), 1e-9))
        end = min(num_samples, pos + utt.size)
        piece = utt[:end - pos].copy()
        if end < pos + utt.size:  # cut: fade out
            fade = min(piece.size, int(0.02 * SAMPLE_RATE))
            piece[piece.size - fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
        audio[pos:end] = piece
        texts.append(text)
        segments.append((pos, end))
        pos = end + int(rng.uniform(0.3, 0.9) * SAMPLE_RATE)
    return Speech(audio=audio, transcript=" ".join(texts), segments=tuple(segments), backend=backend)


@dataclasses.dataclass(frozen=True)
class AudioFeatures:
    """Per-video-frame features of a waveform (see the module docstring)."""

    rms: np.ndarray      # float32 [T]
    gate: np.ndarray     # bool [T], True where there is sound
    loud: np.ndarray     # float32 [T] in [0, 1]
    low: np.ndarray      # float32 [T] in [0, 1]
    bright: np.ndarray   # float32 [T] in [0, 1]
    open: np.ndarray     # float32 [T] in [0, 1], the mouth track


def num_frames_for(num_samples: int) -> int:
    return num_samples // SAMPLES_PER_FRAME


def audio_features(audio: np.ndarray, num_frames: int | None = None) -> AudioFeatures:
    """Frame the waveform at 25 fps and compute the features of the mouth track."""
    audio = np.asarray(audio, np.float32)
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono [N], got shape {audio.shape}")
    t_frames = num_frames_for(audio.size) if num_frames is None else int(num_frames)
    half = WINDOW // 2
    padded = np.pad(audio, (half, half + SAMPLES_PER_FRAME * 2))
    centres = (np.arange(t_frames) + 0.5) * SAMPLES_PER_FRAME
    starts = centres.astype(np.int64)  # window [c - half, c + half) in padded coordinates
    idx = starts[:, None] + np.arange(WINDOW)[None, :]
    idx = np.minimum(idx, padded.size - 1)
    win = np.hanning(WINDOW).astype(np.float32)
    frames = padded[idx] * win
    rms = np.sqrt((frames ** 2).sum(1) / (win ** 2).sum()).astype(np.float32)
    gate = rms >= SILENCE_RMS
    loud = np.clip((20 * np.log10(rms + 1e-12) - SILENCE_DB) / LOUDNESS_RANGE_DB, 0, 1)
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2
    freqs = np.fft.rfftfreq(WINDOW, 1.0 / SAMPLE_RATE)
    total = power.sum(1) + 1e-20
    low = power[:, freqs < 1000].sum(1) / total
    centroid = (power * freqs).sum(1) / total
    bright = np.clip((centroid - 500.0) / 2500.0, 0, 1)
    raw = loud * (0.35 + 0.65 * low)
    smooth = raw.copy()
    if t_frames > 1:
        p = np.pad(raw, 1, mode="edge")
        smooth = 0.25 * p[:-2] + 0.5 * p[1:-1] + 0.25 * p[2:]
    opened = np.where(gate, smooth, 0.0)
    f32 = lambda a: np.asarray(a, np.float32)
    return AudioFeatures(rms=f32(rms), gate=gate, loud=f32(loud), low=f32(low), bright=f32(bright),
                         open=f32(np.clip(opened, 0, 1)))


def mouth_track(audio: np.ndarray, fps: int = FPS, num_frames: int | None = None) -> np.ndarray:
    """The ground-truth mouth opening in [0, 1] per video frame (0 exactly in silence)."""
    if fps != FPS:
        raise ValueError(f"AvatarWorld runs at {FPS} fps, got fps={fps}")
    return audio_features(audio, num_frames).open


def silent_frames(audio: np.ndarray, num_frames: int | None = None) -> np.ndarray:
    """bool [T]: frames whose analysis window holds no sound (the mouth must be shut there)."""
    return ~audio_features(audio, num_frames).gate
