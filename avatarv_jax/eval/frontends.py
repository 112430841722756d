"""The SyncNet front ends: mouth crops from masks or landmarks, and MFCCs at 100 Hz.

SyncNet compares 0.2 s of video (5 frames at 25 fps) with 0.2 s of audio (20 MFCC frames at
100 Hz, 13 coefficients each). Video: a square grey-level crop around the mouth, one box per
clip (the median over frames), so the crop does not jitter with detection noise and the network
sees the lips move inside a steady window. The box comes from AvatarWorld's mouth and face masks
or from dlib's 68 landmarks (points 48-67: the mouth; 0-16: the jaw line, for the face size).
Audio: the classic MFCC recipe (pre-emphasis 0.97, 25 ms Hamming windows every 10 ms, 512-point
FFT, 26 mel filters up to 8 kHz, log, DCT-II, the first 13 coefficients).
"""

from __future__ import annotations

import numpy as np
import scipy.fft

SAMPLE_RATE = 16000
FPS = 25
MFCC_RATE = 100
MFCC_PER_FRAME = MFCC_RATE // FPS    # 4 MFCC frames per video frame
NUM_MFCC = 13
WINDOW_FRAMES = 5                    # video frames per SyncNet window
WINDOW_MFCC = WINDOW_FRAMES * MFCC_PER_FRAME  # 20
CROP_SIZE = 32                       # side of the mouth crop the network reads
MOUTH_BOX_SCALE = 0.5                # crop side as a fraction of the face height
ENERGY_FLOOR = 1e-8                  # mel energies below this count as silence (log floor)


def _mel(hz):
    return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def _hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


def mel_filterbank(num_filters: int = 26, n_fft: int = 512, sample_rate: int = SAMPLE_RATE,
                   low_hz: float = 0.0, high_hz: float | None = None) -> np.ndarray:
    """Triangular mel filters [num_filters, n_fft // 2 + 1] on FFT bins."""
    high_hz = sample_rate / 2 if high_hz is None else high_hz
    points = _hz(np.linspace(_mel(low_hz), _mel(high_hz), num_filters + 2))
    bins = np.floor((n_fft + 1) * points / sample_rate).astype(int)
    bank = np.zeros((num_filters, n_fft // 2 + 1))
    for i in range(num_filters):
        lo, mid, hi = bins[i], bins[i + 1], bins[i + 2]
        if mid > lo:
            bank[i, lo:mid] = (np.arange(lo, mid) - lo) / (mid - lo)
        if hi > mid:
            bank[i, mid:hi] = (hi - np.arange(mid, hi)) / (hi - mid)
    return bank


def mfcc(audio: np.ndarray, sample_rate: int = SAMPLE_RATE, num_coeffs: int = NUM_MFCC,
         num_filters: int = 26, n_fft: int = 512, win_s: float = 0.025,
         hop_s: float = 1.0 / MFCC_RATE, preemphasis: float = 0.97) -> np.ndarray:
    """float32 [N // hop, num_coeffs]: MFCCs at 100 Hz, frame j centred on sample j * hop.

    The waveform is zero-padded by half a window on each side so that frame j describes the
    audio around j * 10 ms, and 4 MFCC frames line up with each 25 fps video frame.
    """
    audio = np.asarray(audio, np.float64)
    if audio.ndim != 1:
        raise ValueError(f"audio must be mono [N], got shape {audio.shape}")
    if sample_rate != SAMPLE_RATE:
        raise ValueError(f"audio must be {SAMPLE_RATE} Hz, got {sample_rate}")
    win, hop = int(round(win_s * sample_rate)), int(round(hop_s * sample_rate))
    count = audio.size // hop
    if count < 1:
        raise ValueError(f"audio of {audio.size} samples is shorter than one MFCC hop ({hop})")
    x = np.append(audio[:1], audio[1:] - preemphasis * audio[:-1])
    x = np.pad(x, (win // 2, win))
    idx = np.arange(count)[:, None] * hop + np.arange(win)[None, :]
    frames = x[idx] * np.hamming(win)
    power = np.abs(np.fft.rfft(frames, n_fft)) ** 2 / n_fft
    energies = power @ mel_filterbank(num_filters, n_fft, sample_rate).T
    logs = np.log(np.maximum(energies, ENERGY_FLOOR))
    return scipy.fft.dct(logs, type=2, axis=1, norm="ortho")[:, :num_coeffs].astype(np.float32)


def mfcc_for_frames(audio: np.ndarray, num_frames: int) -> np.ndarray:
    """MFCCs cut or zero-padded to exactly 4 per video frame: [num_frames * 4, 13]."""
    m = mfcc(audio)
    want = num_frames * MFCC_PER_FRAME
    if m.shape[0] < want:
        m = np.concatenate([m, np.repeat(m[-1:], want - m.shape[0], 0)])
    return m[:want]


def _bbox(mask: np.ndarray) -> np.ndarray | None:
    ys, xs = np.nonzero(mask)
    if ys.size == 0:
        return None
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float64)


def mouth_box_from_masks(mouth: np.ndarray, face: np.ndarray,
                         scale: float = MOUTH_BOX_SCALE) -> np.ndarray:
    """One square box (x0, y0, x1, y1) for a clip from bool masks [T, H, W].

    Centre: the median over frames of the mouth mask's box centre; side: ``scale`` times the
    median face height.
    """
    mouth, face = np.asarray(mouth, bool), np.asarray(face, bool)
    if mouth.ndim != 3 or mouth.shape != face.shape:
        raise ValueError(f"masks must be bool [T, H, W] of one shape, got {mouth.shape} and "
                         f"{face.shape}")
    mouths = [b for b in map(_bbox, mouth) if b is not None]
    faces = [b for b in map(_bbox, face) if b is not None]
    if not mouths or not faces:
        raise ValueError("no mouth or no face in the masks: cannot place a mouth crop")
    m, f = np.median(np.stack(mouths), 0), np.median(np.stack(faces), 0)
    centre = np.array([(m[0] + m[2]) / 2, (m[1] + m[3]) / 2])
    return _square(centre, scale * (f[3] - f[1]))


def mouth_box_from_landmarks(landmarks: np.ndarray, scale: float = MOUTH_BOX_SCALE) -> np.ndarray:
    """One square box for a clip from dlib 68-point landmarks [T, 68, 2] (NaN frames skipped).

    Centre: the median mouth centre (points 48-67); side: ``scale`` times the median face
    height, taken as 1.25 times the span from the brows' mean height (17-26) to the chin (8).
    """
    lm = np.asarray(landmarks, np.float64)
    if lm.ndim != 3 or lm.shape[1:] != (68, 2):
        raise ValueError(f"landmarks must be [T, 68, 2], got {lm.shape}")
    ok = np.isfinite(lm).all(axis=(1, 2))
    if not ok.any():
        raise ValueError("no frame has landmarks: cannot place a mouth crop")
    lm = lm[ok]
    centre = np.median(lm[:, 48:68].mean(1), 0)
    height = 1.25 * np.median(lm[:, 8, 1] - lm[:, 17:27, 1].mean(1))
    return _square(centre, scale * height)


def _square(centre: np.ndarray, side: float) -> np.ndarray:
    side = max(float(side), 4.0)
    return np.array([centre[0] - side / 2, centre[1] - side / 2,
                     centre[0] + side / 2, centre[1] + side / 2])


def crop_mouths(frames: np.ndarray, box: np.ndarray, size: int = CROP_SIZE) -> np.ndarray:
    """uint8 [T, H, W, 3] and a box -> float32 [T, size, size] grey levels in [-1, 1].

    Bilinear sampling at the centres of a size x size grid over the box (area-averaged first
    when the box is more than twice the output, so large frames do not alias); outside the
    frame the edge pixels repeat.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {frames.shape}")
    grey = frames.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    x0, y0, x1, y1 = (float(v) for v in box)
    factor = int((x1 - x0) // (2 * size))
    if factor > 1:  # box-average to keep the sampling near one pixel per output
        t, h, w = grey.shape
        h2, w2 = h // factor, w // factor
        grey = grey[:, :h2 * factor, :w2 * factor].reshape(t, h2, factor, w2, factor).mean((2, 4))
        x0, y0, x1, y1 = (v / factor for v in (x0, y0, x1, y1))
    h, w = grey.shape[1:]
    ys = y0 + (np.arange(size) + 0.5) * (y1 - y0) / size - 0.5
    xs = x0 + (np.arange(size) + 0.5) * (x1 - x0) / size - 0.5
    yi, xi = np.floor(ys).astype(int), np.floor(xs).astype(int)
    fy, fx = (ys - yi)[:, None], (xs - xi)[None, :]
    ya, yb = np.clip(yi, 0, h - 1), np.clip(yi + 1, 0, h - 1)
    xa, xb = np.clip(xi, 0, w - 1), np.clip(xi + 1, 0, w - 1)
    g = grey
    out = ((1 - fy) * (1 - fx) * g[:, ya][:, :, xa] + (1 - fy) * fx * g[:, ya][:, :, xb]
           + fy * (1 - fx) * g[:, yb][:, :, xa] + fy * fx * g[:, yb][:, :, xb])
    return (out / 127.5 - 1.0).astype(np.float32)


def video_windows(crops: np.ndarray) -> np.ndarray:
    """[T, S, S] crops -> [T - 4, S, S, 5]: window t stacks frames t..t+4 as channels."""
    t = crops.shape[0]
    if t < WINDOW_FRAMES:
        raise ValueError(f"a clip needs at least {WINDOW_FRAMES} frames, got {t}")
    idx = np.arange(t - WINDOW_FRAMES + 1)[:, None] + np.arange(WINDOW_FRAMES)[None, :]
    return np.moveaxis(crops[idx], 1, -1)


def audio_windows(mfccs: np.ndarray, num_windows: int) -> np.ndarray:
    """[4T, 13] MFCCs -> [num_windows, 13, 20, 1]: window t covers video frames t..t+4."""
    need = (num_windows - 1) * MFCC_PER_FRAME + WINDOW_MFCC
    if mfccs.shape[0] < need:
        raise ValueError(f"{num_windows} windows need {need} MFCC frames, got {mfccs.shape[0]}")
    idx = np.arange(num_windows)[:, None] * MFCC_PER_FRAME + np.arange(WINDOW_MFCC)[None, :]
    return np.swapaxes(mfccs[idx], 1, 2)[..., None]
