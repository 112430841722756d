"""Train SyncNet on AvatarWorld: contrastive over audio offsets (shifted-audio negatives).

Each training example is a segment of L consecutive 5-frame windows of one clip. Window t's
video embedding is scored against the audio embeddings of windows t-K..t+K of the same clip
(cosine times a fixed scale); cross-entropy picks offset 0. The negatives are the same voice
shifted in time, so the network has to read timing from the lips, not who is speaking. Clips
are training-split people in training-split scenes at 64 and 128 px, with the mouth box jittered
(position +-10 %, size +-10 %) so that the model tolerates imprecise crops of generated video;
evaluation uses held-out people in held-out scenes.

    python -m avatarv_jax.eval.syncnet_train --clips 160 --steps 1000 \
        --out avatarv_jax/eval/assets/syncnet_avatarworld.safetensors \
        --report benchmarks/results/eval_syncnet_train.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from avatarv_jax.data.avatarworld import identity as idn
from avatarv_jax.data.avatarworld import make_clip
from avatarv_jax.data.avatarworld.speech import LANGUAGE_CODES
from avatarv_jax.eval import frontends as fe
from avatarv_jax.eval import lse
from avatarv_jax.eval import syncnet as sn


def clip_pool(count: int, seconds: float, split: str, seed: int, resolutions=(64, 128),
              jitter: float = 0.1) -> list[dict]:
    """``count`` AvatarWorld clips as mouth crops [T, S, S] and MFCCs [4T, 13], plus the clip."""
    rng = np.random.default_rng(seed)
    people = idn.ids_in_split(split, max(count // 2, 4))
    scenes = idn.ids_in_split(split, max(count // 2, 4))
    out = []
    for i in range(count):
        clip = make_clip(seed * 100003 + i, int(rng.choice(people)), int(rng.choice(scenes)),
                         str(rng.choice(LANGUAGE_CODES)), duration_s=seconds,
                         resolution=int(rng.choice(resolutions)))
        box = fe.mouth_box_from_masks(clip.masks["mouth"], clip.masks["face"])
        side = box[2] - box[0]
        if jitter:
            centre = (box[:2] + box[2:]) / 2 + rng.uniform(-jitter, jitter, 2) * side
            side *= 1 + rng.uniform(-jitter, jitter)
            box = np.concatenate([centre - side / 2, centre + side / 2])
        out.append({"crops": fe.crop_mouths(clip.frames, box),
                    "mfcc": fe.mfcc_for_frames(clip.audio, clip.num_frames), "clip": clip,
                    "box": box})
    return out


def sample_batch(pool: list[dict], rng: np.random.Generator, batch: int, length: int,
                 max_offset: int):
    """Video windows [B, L, S, S, 5] and audio windows [B, L + 2K, 13, 20, 1]."""
    vids, auds = [], []
    span = length + 2 * max_offset
    for _ in range(batch):
        item = pool[rng.integers(len(pool))]
        windows = item["crops"].shape[0] - fe.WINDOW_FRAMES + 1
        if windows < span:
            raise ValueError(f"clips of {item['crops'].shape[0]} frames are too short for "
                             f"segments of {length} windows with offsets +-{max_offset}")
        a0 = int(rng.integers(windows - span + 1))
        crops = item["crops"][a0 + max_offset:a0 + max_offset + length + fe.WINDOW_FRAMES - 1]
        gain = rng.uniform(0.8, 1.2)
        vids.append(np.clip(fe.video_windows(crops) * gain + rng.uniform(-0.1, 0.1), -1, 1))
        mf = item["mfcc"][a0 * fe.MFCC_PER_FRAME:]
        auds.append(fe.audio_windows(mf, span))
    return np.stack(vids).astype(np.float32), np.stack(auds).astype(np.float32)


def offset_loss(model: sn.SyncNet, video, audio, max_offset: int, scale: float = 10.0):
    """Cross-entropy over the 2K + 1 audio offsets of each video window (target: offset 0)."""
    b, l = video.shape[:2]
    v = model.video(video.reshape((b * l,) + video.shape[2:])).reshape(b, l, -1)
    a = model.audio(audio.reshape((-1,) + audio.shape[2:])).reshape(b, audio.shape[1], -1)
    idx = jnp.arange(l)[:, None] + jnp.arange(2 * max_offset + 1)[None, :]
    cand = a[:, idx]                                      # [B, L, 2K + 1, D]
    logits = scale * jnp.einsum("bld,blkd->blk", v, cand)
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.full((b, l), max_offset)).mean()
    acc = (jnp.argmax(logits, -1) == max_offset).mean()
    return loss, acc


def evaluate(model: sn.SyncNet, pool: list[dict], shifts=range(-10, 11, 2), seed: int = 0,
             max_offset: int = lse.MAX_OFFSET) -> dict:
    """Offset accuracy under audio shifts and LSE-C of synced vs. audio-shuffled clips."""
    scorer = sn.SyncScorer(model)
    rng = np.random.default_rng(seed)
    hits, total, synced, shuffled, lse_d = 0, 0, [], [], []
    for i, item in enumerate(pool):
        clip = item["clip"]
        for k in shifts:
            s = lse.clip_sync(scorer, clip.frames, lse.shift_audio(clip.audio, k), item["box"],
                              max_offset)
            hits += int(s.offset == k)
            total += 1
            if k == 0:
                synced.append(s.lse_c)
                lse_d.append(s.lse_d)
        other = pool[(i + 1 + int(rng.integers(len(pool) - 1))) % len(pool)]["clip"].audio
        other = np.resize(other, clip.audio.size)
        shuffled.append(lse.clip_sync(scorer, clip.frames, other, item["box"], max_offset).lse_c)
    synced, shuffled = np.array(synced), np.array(shuffled)
    return {"offset_accuracy": hits / total, "offset_trials": total,
            "lse_c_synced_mean": float(synced.mean()), "lse_c_shuffled_mean": float(shuffled.mean()),
            "lse_d_synced_mean": float(np.mean(lse_d)),
            "pairs_synced_above_shuffled": float((synced[:, None] > shuffled[None, :]).mean())}


def train(pool: list[dict], steps: int, *, batch: int = 12, length: int = 24,
          max_offset: int = 12, lr: float = 2e-3, seed: int = 0,
          config: sn.SyncNetConfig | None = None, init: str | None = None,
          log_every: int = 100) -> tuple[sn.SyncNet, list[dict]]:
    model = sn.load_syncnet(init) if init else sn.make_syncnet(config, seed)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(100, steps // 10 + 1), steps)
    opt = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=1e-4), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, video, audio):
        (loss, acc), grads = nnx.value_and_grad(
            lambda m: offset_loss(m, video, audio, max_offset), has_aux=True)(model)
        opt.update(model, grads)
        return loss, acc

    rng = np.random.default_rng(seed)
    log, t0, run = [], time.time(), []
    for i in range(1, steps + 1):
        v, a = sample_batch(pool, rng, batch, length, max_offset)
        loss, acc = step(model, opt, jnp.asarray(v), jnp.asarray(a))
        run.append((float(loss), float(acc)))
        if i % log_every == 0 or i == steps:
            l, a_ = np.mean(run, 0)
            run = []
            log.append({"step": i, "loss": float(l), "window_accuracy": float(a_),
                        "seconds": time.time() - t0})
            print(f"step {i} loss {l:.3f} window acc {a_:.3f} {time.time() - t0:.0f}s",
                  flush=True)
    return model, log


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=160)
    p.add_argument("--seconds", type=float, default=4.0)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch", type=int, default=12)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", help="warm start from a SyncNet safetensors file")
    p.add_argument("--eval-clips", type=int, default=24)
    p.add_argument("--out", required=True)
    p.add_argument("--report")
    args = p.parse_args(argv)
    if args.clips < 2 or args.steps < 1 or args.seconds * fe.FPS < 60:
        print("error: need --clips >= 2, --steps >= 1 and --seconds >= 2.4", file=sys.stderr)
        return 2
    t0 = time.time()
    pool = clip_pool(args.clips, args.seconds, "train", args.seed)
    t_data = time.time() - t0
    print(f"{len(pool)} training clips in {t_data:.0f}s", flush=True)
    model, log = train(pool, args.steps, batch=args.batch, lr=args.lr, seed=args.seed,
                       init=args.init)
    t_train = time.time() - t0 - t_data
    held = clip_pool(args.eval_clips, args.seconds, "heldout", args.seed + 1000, jitter=0.0)
    result = evaluate(model, held)
    print(json.dumps(result, indent=1))
    meta = {"clips": args.clips, "seconds": args.seconds, "steps": args.steps,
            "batch": args.batch, "lr": args.lr, "seed": args.seed, "heldout": result}
    sn.save_syncnet(model, args.out, meta)
    if args.report:
        from avatarv_jax.tools.bench_io import host_info, write_json
        write_json(host_info(data_seconds=t_data, train_seconds=t_train, **meta, log=log),
                   args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
