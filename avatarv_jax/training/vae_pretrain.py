"""Autoencoder pre-training of a small causal VAE on AvatarWorld frames.

The tiny preset has no published weights; frozen at random init it reconstructs held-out clips
at about 9 dB PSNR, which bounds every DiT trained in its latent space (docs/training.md).
This module fits it as a plain VAE (L1 + L2 reconstruction from a posterior sample plus a small
KL) on a mix of single frames (cheap, teach the spatial path) and short video windows (teach the
temporal path), and writes the parameters as safetensors that ``load_pretrained_vae`` restores.

    python -m avatarv_jax.training.vae_pretrain --shards DIR --heldout DIR2 \\
        --out vae_tiny.safetensors --steps 2000

``--normalize-latents`` folds the latents' measured per-channel mean and std into the weights,
so the DiT trains on mean-0, std-1 latents under the preset's name (``fold_latent_statistics``);
with ``--init FILE --steps 0`` it converts an existing file.

On CPU, pin it to one core with ``taskset -c 1`` and
``XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from avatarv_jax.io.small_weights import load_params, read_weights, save_weights
from avatarv_jax.models.vae import CausalVideoVAE, VAEConfig

VAE_PRESETS: dict[str, Callable[[], VAEConfig]] = {"tiny": VAEConfig.tiny,
                                                    "tiny_s4": VAEConfig.tiny_s4}
FORMAT = "avatarv-vae-pretrain-v1"


# ---- data ---------------------------------------------------------------------------------------

def load_clip_frames(directory: str, resolution: int | None = None,
                     max_clips: int | None = None, *, with_mouth: bool = False) -> np.ndarray:
    """All clips of an AvatarWorld shard set as uint8 ``[N, T, H, W, 3]`` (held in memory).

    Clips are cut to the shortest clip's length; ``resolution`` (when given) must match. With
    ``with_mouth`` a fourth channel holds the mouth mask grown by one pixel (0 or 255), so
    windows, flips and batches carry it along with the pixels (``split_mouth``).
    """
    from avatarv_jax.data.avatarworld import AvatarWorldDataset

    ds = AvatarWorldDataset(directory)
    n = len(ds) if max_clips is None else min(len(ds), max_clips)
    if n == 0:
        raise ValueError(f"{directory} holds no clips")
    clips = []
    for i in range(n):
        clip = ds[i]
        frames = np.asarray(clip.frames, np.uint8)
        if with_mouth:
            mouth = _grow(np.asarray(clip.masks["mouth"], bool))
            frames = np.concatenate([frames, (mouth * 255).astype(np.uint8)[..., None]], -1)
        clips.append(frames)
    size = clips[0].shape[1]
    if resolution is not None and size != resolution:
        raise ValueError(f"{directory} is rendered at {size} px, --resolution is {resolution}")
    length = min(c.shape[0] for c in clips)
    return np.stack([c[:length] for c in clips])


def _grow(mask: np.ndarray) -> np.ndarray:
    """[T, H, W] bool mask dilated by one pixel (3x3): the lips around the mouth opening."""
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
    h, w = mask.shape[1:]
    return np.any([padded[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)], 0)


def split_mouth(batch: np.ndarray | jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """uint8 ``[..., 3 or 4]`` -> (video in ``[-1, 1]``, mouth mask in {0, 1} or None)."""
    if batch.shape[-1] == 4:
        return to_unit(batch[..., :3]), jnp.asarray(batch[..., 3:], jnp.float32) / 255.0
    return to_unit(batch), None


def to_unit(frames: np.ndarray | jax.Array) -> jax.Array:
    """uint8 frames -> float32 in ``[-1, 1]`` (the VAE's input range)."""
    return jnp.asarray(frames, jnp.float32) / 127.5 - 1.0


class BatchSampler:
    """Random training batches: video windows of ``frames`` or single frames (``T = 1``)."""

    def __init__(self, clips: np.ndarray, frames: int, batch: int, image_batch: int, seed: int):
        if clips.shape[1] < frames:
            raise ValueError(f"clips have {clips.shape[1]} frames, a window needs {frames}")
        self.clips, self.frames, self.batch, self.image_batch = clips, frames, batch, image_batch
        self.rng = np.random.default_rng(seed)

    def _flip(self, x: np.ndarray) -> np.ndarray:
        flip = self.rng.random(x.shape[0]) < 0.5  # mirror faces: free extra variety
        x = x.copy()
        x[flip] = x[flip][:, :, :, ::-1]
        return x

    def video(self) -> np.ndarray:
        n, t = self.clips.shape[:2]
        idx = self.rng.integers(0, n, self.batch)
        start = self.rng.integers(0, t - self.frames + 1, self.batch)
        return self._flip(np.stack([self.clips[i, s:s + self.frames]
                                    for i, s in zip(idx, start)]))

    def images(self) -> np.ndarray:
        n, t = self.clips.shape[:2]
        idx = self.rng.integers(0, n, self.image_batch)
        when = self.rng.integers(0, t, self.image_batch)
        return self._flip(self.clips[idx, when][:, None])


# ---- model, loss, step --------------------------------------------------------------------------

def posterior(vae: CausalVideoVAE, video: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Unnormalised posterior ``(mean, logvar)`` of a whole video in ``[-1, 1]``."""
    _, mean, logvar = vae.encode_moments_chunk(vae.init_encode_cache(), video)
    return mean, logvar


def decode_raw(vae: CausalVideoVAE, z: jax.Array) -> jax.Array:
    """Unnormalised latents -> unclamped video (clamping would stop the gradient)."""
    return vae.decoder(vae.post_quant_conv(z.astype(vae.config.dtype))[0])[0].astype(jnp.float32)


def vae_loss(vae: CausalVideoVAE, video: jax.Array, rng: jax.Array, kl_weight: float,
             mouth: jax.Array | None = None, mouth_weight: float = 0.0
             ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """L1 + L2 of the reconstruction from a posterior sample, plus ``kl_weight`` * KL per value.

    With a mouth mask ``[..., 1]`` each pixel's error counts ``1 + mouth_weight * mask`` times:
    the mouth is a few dozen pixels at 64 px, and a plain mean lets the VAE blur exactly the
    detail lip sync is judged on. ``l1`` / ``l2`` in the metrics stay the plain means.
    """
    mean, logvar = posterior(vae, video)
    z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(rng, mean.shape, mean.dtype)
    recon = decode_raw(vae, z)
    err1, err2 = jnp.abs(recon - video), jnp.square(recon - video)
    l1, l2 = jnp.mean(err1), jnp.mean(err2)
    kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    metrics = {"l1": l1, "l2": l2, "kl": kl}
    if mouth is not None and mouth_weight > 0:
        weight = 1.0 + mouth_weight * mouth
        total = jnp.mean(err1 * weight) + jnp.mean(err2 * weight) + kl_weight * kl
        metrics["mouth_l1"] = jnp.sum(err1 * mouth) / jnp.maximum(3.0 * jnp.sum(mouth), 1.0)
    else:
        total = l1 + l2 + kl_weight * kl
    return total, {"loss": total, **metrics}


def start_near_deterministic(vae: CausalVideoVAE, logvar: float) -> None:
    """Set the posterior log-variance bias of ``quant_conv`` to ``logvar`` (an experiment knob).

    At random init the posterior std is about 1, as large as the means. Starting at a small std
    (``-6``) was tried against the plain init on AvatarWorld (64 px, batch 4 x 9 frames): held-out
    PSNR 11.6 dB vs 14.2 dB after 200 steps, so the default leaves the init alone.
    """
    bias = vae.quant_conv.bias
    z = vae.config.z_dim
    bias[...] = bias[...].at[z:].set(logvar)


def make_train_step(graphdef, optimizer: optax.GradientTransformation, kl_weight: float,
                    mouth_weight: float = 0.0):
    """A jitted ``(params, opt_state, batch, rng) -> (params, opt_state, metrics)``; ``batch``
    is uint8 frames, with the mouth mask as a fourth channel when ``mouth_weight`` is set."""

    def loss_of_params(params, batch, rng):
        video, mouth = split_mouth(batch)
        return vae_loss(nnx.merge(graphdef, params), video, rng, kl_weight, mouth, mouth_weight)

    @jax.jit
    def step(params, opt_state, batch, rng):
        (_, metrics), grads = jax.value_and_grad(loss_of_params, has_aux=True)(params, batch, rng)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        metrics["grad_norm"] = optax.global_norm(grads)
        return optax.apply_updates(params, updates), opt_state, metrics

    return step


# ---- evaluation ---------------------------------------------------------------------------------

def _usable_frames(t: int, stride: int) -> int:
    return 1 + (t - 1) // stride * stride


@functools.partial(jax.jit, static_argnums=0)
def _per_clip_mse(graphdef, params, frames):
    """[B] mean squared error on ``[0, 1]`` pixels, over the mouth mask when frames carry one."""
    model = nnx.merge(graphdef, params)
    video, mouth = split_mouth(frames)
    err = jnp.square((model.decode(model.encode(video)) - video) / 2.0)
    if mouth is None:
        return jnp.mean(err, axis=(1, 2, 3, 4))
    return (jnp.sum(err * mouth, axis=(1, 2, 3, 4))
            / jnp.maximum(3.0 * jnp.sum(mouth, axis=(1, 2, 3, 4)), 1.0))


def reconstruction_psnr(vae: CausalVideoVAE, clips, *, batch: int = 4) -> float:
    """Mean PSNR (dB, on ``[0, 1]`` pixels) of whole clips encoded (posterior mean) and decoded.

    ``clips``: uint8 ``[N, T, H, W, 3]``; each clip is cut to the longest ``1 + 4k`` prefix.
    Clips loaded ``with_mouth`` (a fourth channel) give the PSNR of the mouth region alone.
    """
    clips = np.asarray(clips)
    if clips.ndim != 5 or clips.shape[-1] not in (3, 4):
        raise ValueError(f"clips must be [N, T, H, W, 3] (or 4 with a mouth mask), got shape "
                         f"{clips.shape}")
    clips = clips[:, :_usable_frames(clips.shape[1], vae.config.temporal_stride)]
    graphdef, params = nnx.split(vae, nnx.Param)
    mse = np.concatenate([np.asarray(_per_clip_mse(graphdef, params, clips[i:i + batch]))
                          for i in range(0, len(clips), batch)])
    return float(np.mean(10.0 * np.log10(1.0 / np.maximum(mse, 1e-10))))


def latent_moments(vae: CausalVideoVAE, clips, *, batch: int = 4
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (float64) of the normalised latents (posterior mean) of
    ``clips`` (uint8 ``[N, T, H, W, 3]``)."""
    clips = np.asarray(clips)
    clips = clips[:, :_usable_frames(clips.shape[1], vae.config.temporal_stride)]
    encode = nnx.jit(lambda m, x: m.encode(to_unit(x)))
    z = np.concatenate([np.asarray(encode(vae, clips[i:i + batch]))
                        for i in range(0, len(clips), batch)])
    z = z.reshape(-1, z.shape[-1]).astype(np.float64)
    return z.mean(0), z.std(0)


def latent_statistics(vae: CausalVideoVAE, clips, *, batch: int = 4) -> dict[str, list[float]]:
    """``latent_moments`` rounded for a JSON report."""
    mean, std = latent_moments(vae, clips, batch=batch)
    return {"mean": [round(float(v), 4) for v in mean],
            "std": [round(float(v), 4) for v in std]}


def fold_latent_statistics(vae: CausalVideoVAE, mean, std) -> None:
    """Fold per-channel statistics of the normalised latents into the VAE's 1x1x1 convs, in
    place: afterwards latents with statistics ``mean``/``std`` come out with mean 0 and std 1,
    and ``decode(encode(x))`` is unchanged (up to rounding).

    Flow matching adds unit-variance noise, so its noise levels mean what they say only on
    unit-variance latents. The tiny presets assume mean 0 / std 1, and a VAE trained here
    does not deliver that (per-channel std 0.7 to 2.0 on AvatarWorld); folding the measured
    statistics into ``quant_conv`` (the posterior mean, and the log-variance by the same
    scale) and undoing them in ``post_quant_conv`` fixes the latents without changing the
    config, so the file still loads under its preset name.
    """
    cfg = vae.config
    z = cfg.z_dim
    m, s = np.asarray(mean, np.float64), np.asarray(std, np.float64)
    if m.shape != (z,) or s.shape != (z,):
        raise ValueError(f"latent statistics need {z} values each, got mean {m.shape} and "
                         f"std {s.shape}")
    if not (np.isfinite(m).all() and np.isfinite(s).all() and (s > 0).all()):
        raise ValueError("latent statistics must be finite with a positive std")
    cm = np.asarray(cfg.latents_mean, np.float64)
    cs = np.asarray(cfg.latents_std, np.float64)
    # raw posterior mean mu -> a * mu + c gives normalised latents (z_n - m) / s
    a = 1.0 / s
    c = cm - (cm + cs * m) / s
    kernel = np.asarray(vae.quant_conv.kernel[...], np.float64)     # [1, 1, 1, 2z, 2z]
    bias = np.asarray(vae.quant_conv.bias[...], np.float64)
    kernel[..., :z] *= a
    bias[:z] = a * bias[:z] + c
    bias[z:] += 2.0 * np.log(a)                                     # the std scales by a too
    post_k = np.asarray(vae.post_quant_conv.kernel[...], np.float64)  # [1, 1, 1, z, z]
    post_b = np.asarray(vae.post_quant_conv.bias[...], np.float64)
    post_b = post_b - (c / a) @ post_k[0, 0, 0]
    post_k = post_k / a[:, None]
    for param, value in ((vae.quant_conv.kernel, kernel), (vae.quant_conv.bias, bias),
                         (vae.post_quant_conv.kernel, post_k),
                         (vae.post_quant_conv.bias, post_b)):
        param[...] = jnp.asarray(value, param[...].dtype)


# ---- weights ------------------------------------------------------------------------------------

def config_json(cfg: VAEConfig) -> str:
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "dtype"}
    return json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()})


def save_pretrained_vae(vae: CausalVideoVAE, path: str, preset: str,
                        figures: dict[str, Any]) -> None:
    """fp32 safetensors (temporary name, then rename) with the preset and training figures."""
    save_weights(vae, path, config_json(vae.config),
                 {"format": FORMAT, "preset": preset, **figures}, dtype=np.float32)


def read_pretrained_meta(path: str) -> dict[str, Any]:
    """The ``meta`` record (preset, training figures) of a pretrained VAE file."""
    return json.loads(read_weights(path)[1].get("meta", "{}"))


def load_pretrained_vae(path: str, vae_module: CausalVideoVAE) -> CausalVideoVAE:
    """Restore a ``save_pretrained_vae`` file into ``vae_module`` in place.

    Every parameter name and shape must match; a mismatch raises ``ValueError`` naming it.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained VAE weights {path!r} do not exist")
    tensors, metadata = read_weights(path)
    meta = json.loads(metadata.get("meta", "{}"))
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a pretrained VAE file (format {meta.get('format')!r}, "
                         f"expected {FORMAT!r})")
    return load_params(vae_module, tensors, f"pretrained VAE {path} (preset "
                                            f"{meta.get('preset')!r})")


def vae_config_of_file(path: str) -> VAEConfig:
    """The ``VAEConfig`` a ``save_pretrained_vae`` file was written with (its stored config)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained VAE weights {path!r} do not exist")
    stored = read_weights(path)[1].get("config")
    if not stored:
        raise ValueError(f"{path} stores no VAE config (not written by save_pretrained_vae)")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(stored).items()}
    try:
        return VAEConfig(**fields)
    except TypeError as e:     # a field this version does not know
        raise ValueError(f"{path}: stored VAE config does not fit VAEConfig: {e}") from None


def load_vae_file(path: str) -> CausalVideoVAE:
    """A VAE built from the file's own config, with its weights: no preset name needed, so
    benchmarks can compare VAEs of any shape."""
    return load_pretrained_vae(path, CausalVideoVAE(vae_config_of_file(path), rngs=nnx.Rngs(0)))


# ---- the training loop --------------------------------------------------------------------------

def train(vae: CausalVideoVAE, sampler: BatchSampler, *, steps: int, lr: float,
          kl_weight: float, image_fraction: float, seed: int, heldout: np.ndarray | None = None,
          eval_every: int = 0, init_logvar: float | None = None, mouth_weight: float = 0.0,
          log: Callable[[dict], None] = lambda r: None
          ) -> list[dict[str, Any]]:
    """Train ``vae`` in place; returns the evaluation curve (step, minutes, held-out PSNR, and
    the mouth region's PSNR when ``heldout`` carries mouth masks)."""
    if init_logvar is not None:
        start_near_deterministic(vae, init_logvar)
    graphdef, params = nnx.split(vae, nnx.Param)
    warmup = max(1, min(100, steps // 10))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1),
                                                  end_value=lr * 0.1)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adamw(schedule, b2=0.99, weight_decay=1e-4))
    opt_state = optimizer.init(params)
    step_fn = make_train_step(graphdef, optimizer, kl_weight, mouth_weight)
    rng = jax.random.key(seed)
    chooser = np.random.default_rng(seed + 1)
    curve: list[dict[str, Any]] = []
    start = time.perf_counter()

    def evaluate(step):
        nnx.update(vae, params)
        row = {"step": step, "minutes": round((time.perf_counter() - start) / 60, 2),
               "heldout_psnr": round(reconstruction_psnr(vae, heldout[..., :3]), 2)}
        if heldout.shape[-1] == 4:
            row["heldout_mouth_psnr"] = round(reconstruction_psnr(vae, heldout), 2)
        curve.append(row)
        log({"eval": row})

    if heldout is not None and eval_every:
        evaluate(0)
    for step in range(1, steps + 1):
        image = chooser.random() < image_fraction
        batch = sampler.images() if image else sampler.video()
        rng, key = jax.random.split(rng)
        params, opt_state, metrics = step_fn(params, opt_state, batch, key)
        if step % 25 == 0 or step == steps:
            m = {k: round(float(v), 5) for k, v in metrics.items()}
            if not all(math.isfinite(v) for v in m.values()):
                raise FloatingPointError(f"non-finite loss at step {step}: {m}")
            log({"step": step, "kind": "image" if image else "video",
                 "minutes": round((time.perf_counter() - start) / 60, 2), **m})
        if heldout is not None and eval_every and (step % eval_every == 0 or step == steps):
            evaluate(step)
    nnx.update(vae, params)
    return curve


# ---- CLI ----------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m avatarv_jax.training.vae_pretrain",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", required=True, help="AvatarWorld shard set to train on")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--heldout", help="shard set for the PSNR curve and the final report")
    p.add_argument("--vae", default="tiny", choices=sorted(VAE_PRESETS))
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--frames", type=int, default=9, help="video window, 1 + 4k frames")
    p.add_argument("--batch", type=int, default=4, help="video windows per step")
    p.add_argument("--image-batch", type=int, default=16, help="single frames per image step")
    p.add_argument("--image-fraction", type=float, default=0.0,
                   help="share of steps that train on single frames")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kl-weight", type=float, default=1e-4)
    p.add_argument("--mouth-weight", type=float, default=0.0,
                   help="extra weight of the (one-pixel grown) mouth region in the "
                        "reconstruction loss: each mouth pixel counts 1 + this many times")
    p.add_argument("--init", default=None,
                   help="start from this pre-trained VAE (.safetensors) instead of random "
                        "weights, e.g. to fine-tune on longer windows")
    p.add_argument("--init-logvar", type=float, default=None,
                   help="starting posterior log-variance (default: the random init's, ~0)")
    p.add_argument("--normalize-latents", action="store_true",
                   help="after training, fold the latents' per-channel mean and std (measured "
                        "on --heldout, else on up to 64 training clips) into the weights so "
                        "the DiT sees mean-0, std-1 latents; with --init and --steps 0 this "
                        "converts an existing file")
    p.add_argument("--eval-every", type=int, default=200)
    p.add_argument("--max-clips", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    return p


def _check_args(args) -> str | None:
    if not os.path.isdir(args.shards):
        return f"--shards {args.shards!r} is not a directory"
    if args.init and not os.path.isfile(args.init):
        return f"--init {args.init!r} is not a file"
    if args.heldout and not os.path.isdir(args.heldout):
        return f"--heldout {args.heldout!r} is not a directory"
    parent = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(parent):
        return f"the directory of --out ({parent}) does not exist"
    if not args.out.endswith(".safetensors"):
        return f"--out must end in .safetensors, got {args.out!r}"
    cfg = VAE_PRESETS[args.vae]()
    if args.resolution < cfg.spatial_stride or args.resolution % cfg.spatial_stride:
        return f"--resolution must be a positive multiple of {cfg.spatial_stride}"
    if args.frames < 1 or (args.frames - 1) % cfg.temporal_stride:
        return f"--frames must be 1 + {cfg.temporal_stride}k, got {args.frames}"
    for name in ("batch", "image_batch", "steps"):
        if getattr(args, name) < 1 and not (name == "steps" and args.steps == 0 and args.init):
            return f"--{name.replace('_', '-')} must be >= 1 (0 steps only with --init)"
    if not 0.0 <= args.image_fraction <= 1.0:
        return "--image-fraction must be in [0, 1]"
    if args.lr <= 0 or args.kl_weight < 0 or args.eval_every < 0 or args.mouth_weight < 0:
        return "--lr must be > 0, --kl-weight, --mouth-weight and --eval-every >= 0"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    problem = _check_args(args)
    if problem is None:
        try:
            clips = load_clip_frames(args.shards, args.resolution, args.max_clips,
                                     with_mouth=args.mouth_weight > 0)
            heldout = (load_clip_frames(args.heldout, args.resolution, with_mouth=True)
                       if args.heldout else None)
            sampler = BatchSampler(clips, args.frames, args.batch, args.image_batch, args.seed)
        except (ValueError, FileNotFoundError, OSError) as e:
            problem = str(e)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2

    def log(record):
        print(json.dumps(record), flush=True)

    vae = CausalVideoVAE(VAE_PRESETS[args.vae](), rngs=nnx.Rngs(args.seed))
    if args.init:
        try:
            load_pretrained_vae(args.init, vae)
        except (ValueError, OSError) as e:
            print(f"error: --init {args.init}: {e}", file=sys.stderr)
            return 2
    start = time.perf_counter()
    curve = train(vae, sampler, steps=args.steps, lr=args.lr, kl_weight=args.kl_weight,
                  image_fraction=args.image_fraction, seed=args.seed, heldout=heldout,
                  eval_every=args.eval_every, init_logvar=args.init_logvar,
                  mouth_weight=args.mouth_weight, log=log)
    minutes = (time.perf_counter() - start) / 60
    figures: dict[str, Any] = {
        "steps": args.steps, "train_minutes": round(minutes, 2), "train_clips": len(clips),
        "resolution": args.resolution, "frames": args.frames, "batch": args.batch,
        "image_batch": args.image_batch, "image_fraction": args.image_fraction, "lr": args.lr,
        "kl_weight": args.kl_weight, "mouth_weight": args.mouth_weight,
        "init_logvar": args.init_logvar, "seed": args.seed,
        "init": os.path.basename(args.init) if args.init else None,
        "device": jax.devices()[0].device_kind,
        "curve": curve}
    if args.normalize_latents:
        source = heldout[..., :3] if heldout is not None else clips[:64, ..., :3]
        mean, std = latent_moments(vae, source)
        fold_latent_statistics(vae, mean, std)
        figures["latents_folded"] = {
            "measured_on": "heldout" if heldout is not None else "train",
            "mean": [round(float(v), 4) for v in mean], "std": [round(float(v), 4) for v in std]}
    if heldout is not None:
        figures["heldout_clips"] = len(heldout)
        figures["heldout_psnr"] = (curve[-1]["heldout_psnr"] if curve
                                   else round(reconstruction_psnr(vae, heldout[..., :3]), 2))
        figures["heldout_mouth_psnr"] = (curve[-1]["heldout_mouth_psnr"] if curve
                                         else round(reconstruction_psnr(vae, heldout), 2))
        figures["heldout_latents"] = latent_statistics(vae, heldout[..., :3])
    save_pretrained_vae(vae, args.out, args.vae, figures)
    log({"wrote": args.out, **{k: v for k, v in figures.items() if k != "curve"}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
