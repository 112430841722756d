"""The inference pipeline (DESIGN §8): reference clip + audio (or text) -> mp4 as long as the audio.

1. Reference: frames (25 fps, covered and cropped to the output size) -> VAE latents, its own
   sound -> audio features, its motion (``motion_source``; a ``motion_reference`` clip's motion
   and sound replace it) -> ``RefCache``, built once.
2. Audio -> 16 kHz; the output has ``round(seconds * 25)`` frames.
3. Chunks (``chunks.plan_chunks``): the first from the reference alone, each later one behind
   a clean prefix (the previous chunk's last latents); after the first chunk its last
   ``anchor_latents`` latents join REF as global anchors (the cache is rebuilt once). Text
   keys/values are encoded once per video, audio keys/values once per chunk, and both serve
   every sampling step (``guided.GuidanceCaches``).
4. Each chunk's new latents go through the SR refiner (when on) and the streaming VAE decoder,
   and their frames straight into the mp4: the whole video is never in memory, and the state
   carried between chunks (prefix, anchors, decoder cache) has a fixed size.

``Pipeline`` holds the compiled models (load once, run many jobs); ``generate`` is the
one-call API. Bad input raises ``InferenceInputError`` before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Iterator

import numpy as np
import jax
import jax.numpy as jnp
from flax import nnx

from avatarv_jax.config import get_model_config
from avatarv_jax.data.avatarworld import speech
from avatarv_jax.diffusion import samplers
from avatarv_jax.diffusion.flow import resolution_shift
from avatarv_jax.inference import chunks as chunking
from avatarv_jax.inference import media, motion_source, tts, weights
from avatarv_jax.inference.errors import InferenceInputError
from avatarv_jax.inference.guided import (GuidanceCaches, JointInputs, cached_predictor,
                                          chunk_velocity, joint_predictor)
from avatarv_jax.inference.progress import Progress
from avatarv_jax.inference.settings import InferenceSettings, parse_resolution
from avatarv_jax.models import factory
from avatarv_jax.models.dit import DiT, RefInputs
from avatarv_jax.models.motion import pack_motion
from avatarv_jax.models.text_encoder import encode_text
from avatarv_jax.models.tokenizer import make_tokenizer
from avatarv_jax.models.vae import VAEStreamer
from avatarv_jax.training.sr_batch import downscale_frames, upsample_base_latents

SPF = media.SAMPLE_RATE // media.FPS       # audio samples per video frame (640)


def _jit_module(module: nnx.Module, fn, static_argnums=()):
    """``fn(module, *args)`` jitted over the module's state (split once, merged in the trace)."""
    graphdef, state = nnx.split(module)
    shifted = tuple(i + 1 for i in static_argnums)
    compiled = jax.jit(lambda st, *args: fn(nnx.merge(graphdef, st), *args),
                       static_argnums=shifted)
    return lambda *args: compiled(state, *args)


@dataclasses.dataclass
class Job:
    """One generation request (the CLI flags, as a Python object)."""

    reference: str
    output: str
    audio: str | None = None
    text: str | None = None
    language: str = "en"
    voice: str | None = None
    prompt: str | None = None
    motion_reference: str | None = None
    seed: int = 0
    steps: int | None = None
    guidance_audio: float | None = None
    guidance_text: float | None = None
    resolution: object = None

    @classmethod
    def from_json(cls, values: dict) -> "Job":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise InferenceInputError(f"unknown job fields {sorted(unknown)}; known: "
                                      f"{sorted(known)}")
        if "reference" not in values or "output" not in values:
            raise InferenceInputError("a job needs 'reference' and 'output'")
        return cls(**values)


@dataclasses.dataclass
class Prepared:
    """Everything a job needs before sampling, checked."""

    job: Job
    size: tuple[int, int]
    audio: media.AudioTrack
    num_frames: int
    ref_frames: np.ndarray            # uint8 [Tr, H, W, 3] at the output size
    ref_audio: np.ndarray             # float32 [Tr * 640] (zeros when the clip is silent)
    ref_has_audio: bool
    ref_motion: motion_source.ReferenceMotion
    prompt: str
    steps: int
    text_scale: float
    audio_scale: float


def _is_silent(wave: np.ndarray) -> bool:
    """No 40 ms frame reaches AvatarWorld's silence level (-48 dBFS RMS)."""
    n = max(1, wave.size // SPF)
    frames = np.pad(wave, (0, max(0, n * SPF - wave.size)))[:n * SPF].reshape(n, SPF)
    rms = np.sqrt(np.mean(np.square(frames, dtype=np.float32), axis=1))
    return not bool(np.any(rms >= speech.SILENCE_RMS))


def resolve_config(config=None, checkpoint=None):
    """``config``, else the checkpoint's (or the demo checkpoint's) ``config.json``, else tiny."""
    if config is not None:
        return config
    ckpt = checkpoint if checkpoint is not None else weights.default_checkpoint()
    found = weights.checkpoint_config(ckpt) if ckpt is not None and Path(ckpt).is_dir() else None
    return found or get_model_config("tiny")


def prepare(job: Job, cfg, *, sr: bool = False, motion_extractor="auto", log=print) -> Prepared:
    """Read and check every input of ``job`` (no model needed, so bad input fails fast);
    raises ``InferenceInputError``."""
    s = InferenceSettings.from_config(cfg)
    motion_dim = int(cfg.model.get("motion_dim", 0))
    multiple = 16 * (s.sr_scale if sr else 1)
    size = parse_resolution(job.resolution if job.resolution is not None else s.resolution,
                            multiple=multiple)
    out = Path(job.output)
    if out.suffix.lower() != ".mp4":
        raise InferenceInputError(f"output {out} must end in .mp4")
    if not out.parent.exists():
        raise InferenceInputError(f"output folder {out.parent} does not exist")

    if (job.audio is None) == (job.text is None):
        raise InferenceInputError("give exactly one of an audio file (--audio) or a text "
                                  "(--text)")
    if job.audio is not None:
        audio = media.read_audio(job.audio)
        what = f"audio file {job.audio}"
    else:
        audio = media.AudioTrack.from_wave(tts.synthesize(job.text, job.language, job.voice))
        what = "the speech of --text"
    num_frames = int(round(audio.seconds * media.FPS))
    if num_frames < 1:
        raise InferenceInputError(f"{what} is too short ({audio.seconds * 1000:.0f} ms; at "
                                  f"least {1000 / media.FPS:.0f} ms)")
    if _is_silent(audio.wave):
        raise InferenceInputError(f"{what} is silent (no 40 ms frame louder than "
                                  f"{speech.SILENCE_DB:.0f} dBFS)")
    if job.steps is not None and int(job.steps) < 1:
        raise InferenceInputError(f"steps must be >= 1, got {job.steps}")

    clip = media.read_video(job.reference, size, max_frames=s.ref_frames)
    t = clip.frames.shape[0]
    if t < s.min_ref_frames:
        raise InferenceInputError(
            f"reference video {job.reference} is too short: {t} frames "
            f"({t / media.FPS:.2f} s at 25 fps); at least {s.min_ref_frames} are needed")
    t = 1 + 4 * ((t - 1) // 4)
    frames = clip.frames[:t]
    ref_audio, has_audio = clip.audio, clip.audio is not None
    motion_clip = (job.reference, frames)
    if job.motion_reference is not None:
        mclip = media.read_video(job.motion_reference, size, max_frames=t,
                                 what="motion reference video")
        if mclip.frames.shape[0] < t:
            raise InferenceInputError(
                f"motion reference {job.motion_reference} has {mclip.frames.shape[0]} "
                f"frames; it needs at least the reference's {t}")
        motion_clip = (job.motion_reference, mclip.frames[:t])
        ref_audio, has_audio = mclip.audio, mclip.audio is not None
    if motion_dim:
        ref_motion = motion_source.reference_motion(motion_clip[1], Path(motion_clip[0]),
                                                    motion_dim, motion_extractor)
        if not ref_motion.available:
            log(f"note: reference motion unavailable ({ref_motion.note}); the reference "
                "runs with zero motion")
    else:
        ref_motion = motion_source.ReferenceMotion(np.zeros((t, 0), np.float32), "none",
                                                   "the config has no motion stream")
    ref_audio = (np.zeros(t * SPF, np.float32) if ref_audio is None
                 else ref_audio[:t * SPF].astype(np.float32))
    sampling = cfg.sampling
    return Prepared(
        job=job, size=size, audio=audio, num_frames=num_frames, ref_frames=frames,
        ref_audio=ref_audio, ref_has_audio=has_audio, ref_motion=ref_motion,
        prompt=job.prompt if job.prompt else s.default_prompt,
        steps=int(job.steps or sampling.num_steps),
        text_scale=float(sampling.text_scale if job.guidance_text is None
                         else job.guidance_text),
        audio_scale=float(sampling.audio_scale if job.guidance_audio is None
                          else job.guidance_audio))


class Pipeline:
    """Compiled models of one config (and the SR refiner when ``sr``); runs jobs."""

    def __init__(self, cfg, models: dict[str, nnx.Module], weights_info: weights.WeightsInfo, *,
                 sr_dit: nnx.Module | None = None, sr_weights: weights.WeightsInfo | None = None,
                 sr_steps: int | None = None, motion_extractor="auto", log=print):
        self.cfg, self.log = cfg, log
        self.settings = InferenceSettings.from_config(cfg)
        self.models, self.weights = models, weights_info
        self.sr_dit, self.sr_weights = sr_dit, sr_weights
        # The refiner's Euler steps: its trainer config's (1 after distill_sr), else the setting.
        self.sr_steps = int(sr_steps or self.settings.sr_steps)
        self.motion_extractor = motion_extractor
        self.dit = models["dit"]
        self.motion_dim = self.dit.cfg.motion_dim
        self.tokenizer = make_tokenizer(cfg.get("tokenizer", None) or None)
        self.vae = VAEStreamer(models["vae"])
        self._audio_features = _jit_module(models["audio_encoder"], lambda enc, w: enc(w))
        self._encode_ref = _jit_module(self.dit, lambda d, ref: d.encode_reference(ref))
        self._encode_conds = _jit_module(self.dit, _encode_conditions)
        self._encode_text_caches = _jit_module(self.dit, _text_caches)
        self._to_uint8 = jax.jit(lambda v: jnp.round((v[0] + 1.0) * 127.5).clip(0, 255)
                                 .astype(jnp.uint8))
        self._steps: dict = {}
        if sr_dit is not None:
            self._sr_encode_ref = _jit_module(sr_dit, lambda d, ref: d.encode_reference(ref))
            self._sr_encode_conds = _jit_module(sr_dit, _encode_conditions)
        self._encode_video = _jit_module(models["vae"], lambda vae, v: vae.encode(v))

    # -- construction ---------------------------------------------------------------------------
    @classmethod
    def load(cls, config=None, checkpoint=None, *, sr: bool = False, sr_checkpoint=None,
             motion_extractor="auto", log=print) -> "Pipeline":
        """Build the config's models and restore ``checkpoint`` (see ``weights``).

        ``config``: a ConfigDict; None takes the checkpoint's ``config.json`` (a trainer work
        directory, or the demo checkpoint), else the tiny config.
        """
        weights.check_checkpoint(checkpoint)
        weights.check_checkpoint(sr_checkpoint)
        config = resolve_config(config, checkpoint)
        try:
            models = factory.build_models(config, seed=0)
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise InferenceInputError(f"config {config.get('name', '?')} cannot be built: {e}") \
                from None
        info = weights.load_weights(models, checkpoint, log=log)
        sr_dit = sr_info = sr_steps = None
        if sr:
            sr_dit, sr_info, sr_steps = _load_sr(config, sr_checkpoint, log)
        return cls(config, models, info, sr_dit=sr_dit, sr_weights=sr_info, sr_steps=sr_steps,
                   motion_extractor=motion_extractor, log=log)

    # -- inputs ------------------------------------------------------------------------------------
    def prepare(self, job: Job) -> Prepared:
        """Read and check every input of ``job``; raises ``InferenceInputError``."""
        return prepare(job, self.cfg, sr=self.sr_dit is not None,
                       motion_extractor=self.motion_extractor, log=self.log)

    # -- generation -------------------------------------------------------------------------------
    def frames(self, prep: Prepared, *, use_cache: bool = True, progress: Progress | None = None,
               timings: dict | None = None, on_chunk=None) -> Iterator[np.ndarray]:
        """Yield the output video chunk by chunk as uint8 [n, H, W, 3] (n frames per chunk).

        ``use_cache=False`` runs the joint forward (REF and conditions re-encoded every step)
        instead of the two cache levels; both give the same frames. ``on_chunk(chunk,
        latents)`` sees each chunk's new latents (those decoded) as they are made.
        """
        s, cfg = self.settings, self.cfg
        timings = {} if timings is None else timings
        plan = chunking.plan_chunks(prep.num_frames, s.chunk_latents, s.prefix_latents)
        t0 = time.perf_counter()

        text = self._text(prep.prompt)
        ref = self._reference_inputs(prep)
        grid = ref.latents.shape[2:4]
        _, ph, pw = self.dit.cfg.patch_size
        shift = cfg.sampling.shift or resolution_shift((grid[0] // ph) * (grid[1] // pw))
        sigmas = np.asarray(samplers.sigma_schedule(prep.steps, shift=shift))
        text_cache = uncond_cache = ref_cache = None
        if use_cache:
            text_cache, uncond_cache = self._encode_text_caches(text)
            ref_cache = self._encode_ref(ref)
        sr = self._sr_setup(prep, text) if self.sr_dit is not None else None
        timings["prepare_s"] = time.perf_counter() - t0

        decode_cache = self.vae.init_decode_cache()
        prefix = sr_prefix = None
        for chunk in plan.chunks:
            if progress is not None:
                progress.start_chunk(chunk.index)
            feats = self._chunk_audio(prep.audio.wave, chunk.audio_start, plan.chunk_video_frames)
            step = self._step_fn(prep.text_scale, prep.audio_scale, use_cache)
            if use_cache:
                full = self._encode_conds(jnp.zeros_like(text[:, :0]), feats)
                conds = GuidanceCaches(
                    full=text_cache.replace(audio_keys=full.audio_keys,
                                            audio_values=full.audio_values,
                                            audio_window_mask=full.audio_window_mask,
                                            audio_mask=full.audio_mask),
                    text=text_cache, uncond=uncond_cache, ref=ref_cache,
                    uncond_ref=ref_cache.replace(valid_frames=jnp.zeros((1,), jnp.int32)))
            else:
                conds = JointInputs(text=text, audio=feats, ref=ref)
            x = self._noise(prep.job.seed, chunk, grid)
            for i in range(prep.steps):
                x = step(conds, x, prefix, None, sigmas[i], sigmas[i + 1])
                if progress is not None:
                    progress.step(i)
            new = x
            gen = new if prefix is None else {k: jnp.concatenate([prefix[k], v], axis=1)
                                               for k, v in new.items()}
            if s.prefix_latents:
                prefix = {k: v[:, -s.prefix_latents:] for k, v in gen.items()}
            if chunk.index == 0 and s.anchor_latents and len(plan) > 1:
                ref = self._with_anchors(ref, gen, feats)
                if use_cache:
                    ref_cache = self._encode_ref(ref)
            latents = new["video"]
            if sr is not None:
                latents, sr_prefix = self._refine(sr, chunk, gen["video"], feats, prep.job.seed,
                                                  sr_prefix)
            if on_chunk is not None:
                on_chunk(chunk, latents)
            decode_cache, video = self.vae.decode_chunk(decode_cache, latents)
            frames = np.asarray(self._to_uint8(video))
            frames = frames[:chunk.frame_end - chunk.frame_start]
            if "first_chunk_s" not in timings:
                timings["first_chunk_s"] = time.perf_counter() - t0
            yield frames

    def _text(self, prompt: str):
        emb, _ = encode_text(self.models["text_encoder"], self.tokenizer, [prompt],
                             max_length=self.settings.max_text_length)
        return emb

    def _reference_inputs(self, prep: Prepared) -> RefInputs:
        video = jnp.asarray(prep.ref_frames[None], jnp.float32) / 127.5 - 1.0
        if self.sr_dit is not None:        # the base model runs at 1 / sr_scale of the output
            video = downscale_frames(video, self.settings.sr_scale)
        latents = self._encode_video(video)
        feats = self._audio_features(jnp.asarray(prep.ref_audio)[None])
        motion = None
        if self.motion_dim:
            motion = pack_motion(jnp.asarray(prep.ref_motion.motion)[None])
        return RefInputs(latents=latents, motion=motion, audio=feats,
                         audio_mask=jnp.full((1,), float(prep.ref_has_audio), jnp.float32),
                         valid_frames=jnp.full((1,), latents.shape[1], jnp.int32))

    def _with_anchors(self, ref: RefInputs, gen: dict, feats) -> RefInputs:
        """REF + the first chunk's last ``anchor_latents`` latents (with motion and audio)."""
        a = self.settings.anchor_latents
        f = gen["video"].shape[1]
        anchor_audio = feats[:, 1 + 4 * (f - a - 1):1 + 4 * (f - 1)]   # their 4a video frames
        latents = jnp.concatenate([ref.latents, gen["video"][:, -a:]], axis=1)
        motion = None if ref.motion is None else jnp.concatenate(
            [ref.motion, gen["motion"][:, -a:]], axis=1)
        audio = jnp.concatenate([ref.audio, anchor_audio], axis=1)
        return RefInputs(latents=latents, motion=motion, audio=audio, audio_mask=ref.audio_mask,
                         valid_frames=jnp.full((1,), latents.shape[1], jnp.int32))

    def _chunk_audio(self, wave: np.ndarray, start: int, count: int):
        """Features of video frames ``start .. start+count`` with context either side."""
        m = self.settings.audio_context_frames
        lo, hi = (start - m) * SPF, (start + count + m) * SPF
        window = np.zeros(hi - lo, np.float32)
        a, b = max(lo, 0), min(hi, wave.size)
        if b > a:
            window[a - lo:b - lo] = wave[a:b]
        feats = self._audio_features(jnp.asarray(window)[None])
        return feats[:, m:m + count]

    def _noise(self, seed: int, chunk: chunking.Chunk, grid, stream: int = 0) -> dict:
        """The chunk's starting noise, a function of (seed, stream, chunk index) alone; drawn
        with numpy (nothing to compile, the same numbers on every backend)."""
        rng = np.random.default_rng([seed, stream, chunk.index])
        c = self.dit.cfg.in_channels
        x = {"video": rng.standard_normal((1, chunk.new, *grid, c), np.float32)}
        if self.motion_dim and stream == 0:
            x["motion"] = rng.standard_normal((1, chunk.new, self.dit.cfg.packed_motion_dim),
                                              np.float32)
        return x

    def _step_fn(self, text_scale: float, audio_scale: float, cached: bool, dit=None,
                 method: str | None = None):
        dit = self.dit if dit is None else dit
        method = method or self.cfg.sampling.method
        key = (id(dit), text_scale, audio_scale, cached, method)
        if key not in self._steps:
            def step(model, conds, x, prefix, cond_latents, sigma, sigma_next):
                predict = (cached_predictor if cached else joint_predictor)(model, conds)
                velocity = chunk_velocity(predict, text_scale=text_scale,
                                          audio_scale=audio_scale, prefix=prefix,
                                          cond_latents=cond_latents,
                                          guidance_embedded=model.cfg.guidance_embed)
                return samplers.step(velocity, x, sigma, sigma_next, method=method)
            self._steps[key] = _jit_module(dit, step)
        return self._steps[key]

    # -- SR refiner -------------------------------------------------------------------------------
    def _sr_setup(self, prep: Prepared, text) -> dict:
        video = jnp.asarray(prep.ref_frames, jnp.float32)[None] / 127.5 - 1.0
        latents = self._encode_video(video)
        feats = self._audio_features(jnp.asarray(prep.ref_audio)[None])
        ref = RefInputs(latents=latents, audio=feats,
                        audio_mask=jnp.full((1,), float(prep.ref_has_audio), jnp.float32),
                        valid_frames=jnp.full((1,), latents.shape[1], jnp.int32))
        steps = self.sr_steps
        return {"ref_cache": self._sr_encode_ref(ref), "text": self._sr_encode_conds(text, None),
                "grid": latents.shape[2:4], "sigmas": np.asarray(samplers.sigma_schedule(steps)),
                "step": self._step_fn(1.0, 1.0, True, dit=self.sr_dit, method="euler")}

    def _refine(self, sr: dict, chunk, base_gen, feats, seed: int, sr_prefix):
        """The chunk's new latents at high resolution, conditioned on the upsampled base."""
        cond = upsample_base_latents(base_gen, sr["grid"])   # as the sr stage trains it
        full = self._sr_audio_cache(sr, feats)
        conds = GuidanceCaches(full=full, text=full, uncond=full, ref=sr["ref_cache"],
                               uncond_ref=sr["ref_cache"])
        x = self._noise(seed, chunk, sr["grid"], stream=1)
        sigmas = sr["sigmas"]
        for i in range(len(sigmas) - 1):
            x = sr["step"](conds, x, sr_prefix, cond, sigmas[i], sigmas[i + 1])
        gen = x if sr_prefix is None else {"video": jnp.concatenate([sr_prefix["video"],
                                                                     x["video"]], axis=1)}
        p = self.settings.prefix_latents
        return x["video"], ({"video": gen["video"][:, -p:]} if p else None)

    def _sr_audio_cache(self, sr, feats):
        text_dim = self.sr_dit.cfg.text_dim
        audio = self._sr_encode_conds(jnp.zeros((1, 0, text_dim), jnp.float32), feats)
        return sr["text"].replace(audio_keys=audio.audio_keys, audio_values=audio.audio_values,
                                  audio_window_mask=audio.audio_window_mask,
                                  audio_mask=audio.audio_mask)

    # -- the whole job ----------------------------------------------------------------------------
    def run(self, job: Job | Prepared, *, progress: bool = True, use_cache: bool = True) -> dict:
        """Generate ``job.output`` (mp4) and ``<output>.json``; returns the sidecar dict."""
        t0 = time.perf_counter()
        prep = job if isinstance(job, Prepared) else self.prepare(job)
        job = prep.job
        out = Path(job.output)
        s = self.settings
        plan = chunking.plan_chunks(prep.num_frames, s.chunk_latents, s.prefix_latents)
        bar = Progress(len(plan), prep.steps, enabled=progress)
        timings: dict = {"read_inputs_s": time.perf_counter() - t0}
        h, w = prep.size
        with media.Mp4Writer(out, height=h, width=w, audio=prep.audio) as writer:
            for frames in self.frames(prep, use_cache=use_cache, progress=bar, timings=timings):
                writer.write(frames)
            bar.close()
            if writer.frames_written != prep.num_frames:
                raise RuntimeError(f"wrote {writer.frames_written} frames, expected "
                                   f"{prep.num_frames}")
            total = time.perf_counter() - t0
            timings["total_s"] = total
            timings["seconds_per_output_second"] = total / (prep.num_frames / media.FPS)
            record = self._record(prep, len(plan), timings)
            sidecar = out.with_name(out.name + ".json")
            tmp = media.temporary_name(sidecar)
            tmp.write_text(json.dumps(record, indent=2) + "\n")
            try:
                writer.finish()
                os.replace(tmp, sidecar)
            finally:
                tmp.unlink(missing_ok=True)
        self.log(f"wrote {out} ({prep.num_frames} frames, {prep.num_frames / media.FPS:.2f} s, "
                 f"{w}x{h}) in {total:.1f} s; sidecar {sidecar}")
        return record

    def _record(self, prep: Prepared, num_chunks: int, timings: dict) -> dict:
        job = prep.job
        s = self.settings
        return {
            "inputs": {"reference": job.reference, "audio": job.audio, "text": job.text,
                       "language": job.language if job.text else None,
                       "voice": job.voice if job.text else None, "prompt": prep.prompt,
                       "motion_reference": job.motion_reference},
            "seed": job.seed, "steps": prep.steps,
            "guidance": {"text": prep.text_scale, "audio": prep.audio_scale},
            "output": {"path": job.output, "frames": prep.num_frames, "fps": media.FPS,
                       "seconds": prep.num_frames / media.FPS, "height": prep.size[0],
                       "width": prep.size[1], "audio_seconds": prep.audio.seconds,
                       "audio_rate": prep.audio.rate},
            "reference": {"frames": int(prep.ref_frames.shape[0]),
                          "has_audio": prep.ref_has_audio,
                          "motion_source": prep.ref_motion.source,
                          "motion_note": prep.ref_motion.note},
            "chunks": num_chunks, "inference": dataclasses.asdict(s),
            "sr": self.sr_dit is not None,
            "sr_steps": self.sr_steps if self.sr_dit is not None else None,
            "config": json.loads(self.cfg.to_json_best_effort()),
            "checkpoint": self.weights.to_json(),
            "sr_checkpoint": None if self.sr_weights is None else self.sr_weights.to_json(),
            "device": str(jax.devices()[0].device_kind), "timings": timings,
        }


def _text_caches(dit, text):
    """Text keys/values with the prompt and with zero text (the unconditional pass), once."""
    both = dit.encode_conditions(jnp.concatenate([text, jnp.zeros_like(text)]), None)
    return jax.tree.map(lambda x: x[:, :1], both), jax.tree.map(lambda x: x[:, 1:], both)


def _encode_conditions(dit, text, audio):
    num_frames = None if audio is None else 1 + (audio.shape[1] - 1) // 4
    return dit.encode_conditions(text, audio, num_frames=num_frames)


def _load_sr(cfg, checkpoint, log):
    """The SR refiner and its weights: the config a trainer wrote beside ``checkpoint`` (an
    ``sr`` / ``distill_sr`` work directory), else the SR variant of the base preset
    (``configs/<name>.py:sr``)."""
    sr_cfg = None
    if checkpoint is not None:
        sr_cfg = weights.checkpoint_config(checkpoint)
        if sr_cfg is not None and not int(sr_cfg.get("model", {}).get("cond_channels", 0)):
            raise InferenceInputError(
                f"--sr-checkpoint {checkpoint} holds a {sr_cfg.get('stage', 'base')} model "
                "(cond_channels = 0), not an SR refiner (train one with configs/sr.py)")
    if sr_cfg is None:
        name = str(cfg.get("name", ""))
        try:
            sr_cfg = get_model_config(name.removesuffix("_sr"), "sr")
        except (ValueError, KeyError) as e:
            raise InferenceInputError(f"--sr needs a preset config with an SR variant: {e}") \
                from None
    trained_scale = int(sr_cfg.get("inference", {}).get("sr_scale", 0) or 0)
    wanted = int(cfg.inference.sr_scale)
    if trained_scale and trained_scale != wanted:
        raise InferenceInputError(f"the SR refiner of {checkpoint} was trained for sr_scale "
                                  f"{trained_scale}, the config asks for {wanted}")
    # The DiT alone (the refiner shares the base model's encoders and VAE); it is the first
    # module build_models draws from the seed, so these are build_models' weights.
    dit_cfg = factory.dit_config(sr_cfg)
    sr_dit = nnx.jit(lambda: DiT(dit_cfg, rngs=nnx.Rngs(1)))()
    if checkpoint is None:
        msg = "no --sr-checkpoint: the SR refiner has random weights"
        log(f"WARNING: {msg}")
        return sr_dit, weights.WeightsInfo("random", warning=msg), None
    info = weights.load_weights({"dit": sr_dit}, checkpoint, log=log)
    steps = sr_cfg.get("inference", {}).get("sr_steps", None) if "stage" in sr_cfg else None
    if steps:
        log(f"SR refiner: {sr_cfg.stage} checkpoint, {int(steps)} sampling step(s)")
    return sr_dit, info, steps


def generate(reference, audio=None, *, output, text: str | None = None, language: str = "en",
             voice: str | None = None, prompt: str | None = None, motion_reference=None,
             config=None, checkpoint=None, steps: int | None = None,
             guidance_audio: float | None = None, guidance_text: float | None = None,
             resolution=None, seed: int = 0, sr: bool = False, sr_checkpoint=None,
             motion_extractor="auto", progress: bool = True, log=print) -> dict:
    """Render a talking-avatar mp4 of ``audio`` (or of ``text`` spoken by espeak-ng).

    Returns the sidecar record (also written to ``<output>.json``). Raises
    ``InferenceInputError`` on bad input, leaving no file behind. To run many jobs, build a
    ``Pipeline.load(...)`` once and call ``pipeline.run(Job(...))``.
    """
    job = Job(reference=str(reference), output=str(output),
              audio=None if audio is None else str(audio), text=text, language=language,
              voice=voice, prompt=prompt,
              motion_reference=None if motion_reference is None else str(motion_reference),
              seed=seed, steps=steps, guidance_audio=guidance_audio,
              guidance_text=guidance_text, resolution=resolution)
    config = resolve_config(config, checkpoint)
    prep = prepare(job, config, sr=sr, motion_extractor=motion_extractor, log=log)
    pipe = Pipeline.load(config, checkpoint, sr=sr, sr_checkpoint=sr_checkpoint,
                         motion_extractor=motion_extractor, log=log)
    return pipe.run(prep, progress=progress)
