"""AvatarWorld evaluation: held-out cases, every metric per clip, and each metric over time.

A case is a held-out person in a held-out scene saying something for ``seconds``; its ground
truth is the rendered clip (frames, audio, masks, attributes, style). A generated video of the
case is scored with SyncNet (LSE-C/D and offset, in the mouth box of the ground truth's masks),
the AvatarWorld metrics of ``data/avatarworld/metrics.py`` (lip-sync correlation, silence
closure, attribute agreement, embedding similarity, style match) and face similarity with the
probe embedding against a *different* clip of the same person. Drift: lip-sync correlation,
LSE-C and embedding similarity per window of ``window_s`` seconds (5 by default, no overlap),
with the least-squares slope per second and last minus first.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from avatarv_jax.data.avatarworld import identity as idn
from avatarv_jax.data.avatarworld import make_clip
from avatarv_jax.data.avatarworld import metrics as awm
from avatarv_jax.data.avatarworld import motion as mo
from avatarv_jax.data.avatarworld.speech import LANGUAGE_CODES
from avatarv_jax.eval import face_similarity as fs
from avatarv_jax.eval import frontends as fe
from avatarv_jax.eval import lse

SERIES = ("lip_sync_corr", "lse_c", "embedding_similarity")


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    identity_id: int
    scene_id: int
    language: str
    seed: int
    seconds: float
    resolution: int


@dataclasses.dataclass
class CaseTruth:
    """What the world knows about a case: the clip, the mouth box, the reference person."""

    case: Case
    clip: object                  # avatarworld Clip
    mouth_box: np.ndarray
    reference_frame: np.ndarray   # frame 0 of the ground truth (what a model is given)
    reference_embedding: np.ndarray  # probe embedding of another clip of the same person


def heldout_cases(count: int, seconds: float = 30.0, resolution: int = 128, seed: int = 0
                  ) -> list[Case]:
    """``count`` cases of held-out people in held-out scenes, languages in turn."""
    if count < 1 or seconds * fe.FPS < 2 * lse.MAX_OFFSET + fe.WINDOW_FRAMES:
        raise ValueError(f"need at least one case of at least "
                         f"{(2 * lse.MAX_OFFSET + fe.WINDOW_FRAMES) / fe.FPS:.2f} s")
    people = idn.ids_in_split("heldout", count)
    scenes = idn.ids_in_split("heldout", count, start=8 * (seed % 7))
    return [Case(f"case_{i:03d}", people[i], scenes[(i * 3 + 1) % count],
                 LANGUAGE_CODES[i % len(LANGUAGE_CODES)], seed * 1000 + i, float(seconds),
                 int(resolution)) for i in range(count)]


def render_reference_clip(case: Case):
    """Another 2-s clip of the case's person in the same scene, speaking the next language:
    the reference a video-reference model is given, and the source of the reference identity
    embedding (never the ground truth itself)."""
    return make_clip(case.seed + 500_000, case.identity_id, case.scene_id,
                     LANGUAGE_CODES[(LANGUAGE_CODES.index(case.language) + 1)
                                    % len(LANGUAGE_CODES)],
                     duration_s=2.0, resolution=case.resolution)


def render_case(case: Case, probe) -> CaseTruth:
    clip = make_clip(case.seed, case.identity_id, case.scene_id, case.language,
                     duration_s=case.seconds, resolution=case.resolution)
    other = render_reference_clip(case)
    box = fe.mouth_box_from_masks(clip.masks["mouth"], clip.masks["face"])
    return CaseTruth(case, clip, box, clip.frames[0], probe.read_clip(other.frames).embedding)


class AvatarWorldEvaluator:
    """Scores (frames, audio) of a case. Holds the probe and the SyncNet scorer."""

    def __init__(self, probe, scorer, window_s: float = 5.0):
        self.probe, self.scorer, self.window_s = probe, scorer, window_s
        self.embedder = fs.ProbeEmbedder(probe)

    def score(self, truth: CaseTruth, frames: np.ndarray, audio: np.ndarray
              ) -> tuple[dict[str, float], dict[str, list[float]]]:
        """(flat metrics, per-window series) for one video of ``truth``'s case."""
        frames, audio = np.asarray(frames), np.asarray(audio, np.float32)
        t = frames.shape[0]
        if frames.shape[1:] != truth.clip.frames.shape[1:]:
            raise ValueError(f"frames of {frames.shape[1:]} do not match the case's "
                             f"{truth.clip.frames.shape[1:]}")
        audio = audio[:t * fe.SAMPLE_RATE // fe.FPS]
        if audio.size < t * fe.SAMPLE_RATE // fe.FPS:
            audio = np.pad(audio, (0, t * fe.SAMPLE_RATE // fe.FPS - audio.size))
        crops = fe.crop_mouths(frames, truth.mouth_box, self.scorer.model.config.crop_size)
        v, a = self.scorer.embed(crops, audio)
        out = lse.sync_score(v, a).as_dict()

        r = self.probe.read_clip(frames)
        opening = mo.field(r.motion, "mouth_open")
        out.update(awm.lip_sync(opening, audio))
        out.update(awm.silence_closure(opening, audio))
        out["attribute_agreement"] = awm.attribute_agreement(
            r.attributes, truth.clip.static_attributes)
        out["embedding_similarity"] = awm.embedding_similarity(r.embedding,
                                                               truth.reference_embedding)
        out["face_similarity"] = fs.cosine(
            self.embedder.embed(fs.sample_frames(frames)).mean(0), truth.reference_embedding)
        out.update(awm.style_match(awm.estimate_style(r.motion, audio),
                                   truth.clip.dynamic_style))
        out["motion_std"] = float(r.motion.std(0).mean())

        win = int(round(self.window_s * fe.FPS))
        spf = fe.SAMPLE_RATE // fe.FPS
        slices = awm.windows(t, min(win, t), win)
        series = {k: [] for k in SERIES}
        for w in slices:
            series["lip_sync_corr"].append(awm.lip_sync(
                opening[w], audio[w.start * spf:w.stop * spf])["lip_sync_corr"])
            series["embedding_similarity"].append(awm.embedding_similarity(
                r.frame_embeddings[w].mean(0), truth.reference_embedding))
            nw = w.stop - w.start - fe.WINDOW_FRAMES + 1
            lo = w.start
            hi = min(lo + nw, v.shape[0])
            series["lse_c"].append(lse.sync_score(v[lo:hi], a[lo:hi]).lse_c
                                   if hi - lo > lse.MAX_OFFSET else float("nan"))
        for k, ys in series.items():
            d = awm.drift(np.nan_to_num(ys, nan=0.0), self.window_s)
            out[f"{k}_drift_slope_per_s"] = d["slope_per_s"]
            out[f"{k}_drift_last_minus_first"] = d["last_minus_first"]
        return out, series
