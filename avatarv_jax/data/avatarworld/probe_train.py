"""Train and evaluate the AvatarWorld probe.

Training frames pair random training-split identities with random training-split scenes and
random motion vectors over the whole range (``motion.random_motion``), rendered at 64 px and,
for a quarter of them, at 128 px box-averaged to 64 (what the probe does to larger frames).
Attribute losses count only where the attribute can be seen (``motion.attribute_visibility``).

Evaluation renders real clips (speech-driven motion) of *held-out* identities in *held-out*
scenes and reports R^2 per motion field and accuracy per attribute.

    python -m avatarv_jax.data.avatarworld.probe_train --steps 5000 \
        --out avatarv_jax/data/avatarworld/assets/probe.safetensors
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from avatarv_jax.data.avatarworld import identity as idn
from avatarv_jax.data.avatarworld import motion as mo
from avatarv_jax.data.avatarworld import probe as pb
from avatarv_jax.data.avatarworld import render as rnd
from avatarv_jax.data.avatarworld import scene as scn
from avatarv_jax.data.avatarworld.clip import make_clip

MOTION_LOSS_WEIGHT = 3.0


def _random_id(rng: np.random.Generator, split: str, high: int = 1_000_000) -> int:
    while True:
        i = int(rng.integers(high))
        if idn.split_of(i) == split:
            return i


def _box_down(frames: np.ndarray, factor: int) -> np.ndarray:
    n, h, w, c = frames.shape
    x = frames.reshape(n, h // factor, factor, w // factor, factor, c).astype(np.float32)
    return (x.mean(axis=(2, 4)) + 0.5).astype(np.uint8)


def render_examples(rng: np.random.Generator, num: int, split: str = "train",
                    per_pair: int = 2, hires_fraction: float = 0.25):
    """(frames uint8 [num, 64, 64, 3], motion [num, D], attributes int32 [num, A])."""
    frames, motions, attrs = [], [], []
    count = 0
    while count < num:
        person = idn.sample_identity(_random_id(rng, split))
        place = scn.sample_scene(_random_id(rng, split))
        m = mo.random_motion(rng, per_pair)
        if rng.random() < hires_fraction:
            f = _box_down(rnd.render(person, place, m, 2 * pb.INPUT_SIZE).frames, 2)
        else:
            f = rnd.render(person, place, m, pb.INPUT_SIZE).frames
        frames.append(f)
        motions.append(m)
        attrs.append(np.repeat(person.attributes[None], per_pair, 0))
        count += per_pair
    cat = lambda xs: np.concatenate(xs)[:num]
    return cat(frames), cat(motions), cat(attrs)


def _shift(frames: np.ndarray, rng: np.random.Generator, most: int = 2) -> np.ndarray:
    """Move the batch by up to ``most`` pixels (edge-padded), so the probe does not learn a
    person by where their features sit to the pixel."""
    dy, dx = rng.integers(-most, most + 1, 2)
    p = np.pad(frames, ((0, 0), (most, most), (most, most), (0, 0)), mode="edge")
    h, w = frames.shape[1:3]
    return p[:, most + dy:most + dy + h, most + dx:most + dx + w]


def _visibility_weights(motion: jax.Array) -> jax.Array:
    """float32 [N, A]: 1 where an attribute can be seen in the frame."""
    vis = mo.attribute_visibility(motion)
    w = jnp.ones((motion.shape[0], idn.NUM_ATTRIBUTES), jnp.float32)
    for name in idn.CONDITIONAL_ATTRIBUTES:
        w = w.at[:, idn.ATTRIBUTE_NAMES.index(name)].set(vis[name].astype(jnp.float32))
    return w


def motion_weights(mouth_weight: float = 4.0) -> np.ndarray:
    w = np.ones(mo.MOTION_DIM, np.float32)
    w[mo.MOTION_FIELDS.index("mouth_open")] = mouth_weight
    return w


MOTION_WEIGHTS = motion_weights()


def loss_fn(model: pb.ProbeNet, frames, motion, attrs, weights_motion=MOTION_WEIGHTS):
    unit, logits = model(pb.preprocess(frames))
    target = (motion - mo.MOTION_LOW) / (mo.MOTION_HIGH - mo.MOTION_LOW)
    motion_loss = jnp.mean((unit - target) ** 2 * weights_motion)
    weights = _visibility_weights(motion)
    ce = []
    for i, lg in enumerate(pb.split_logits(logits)):
        ce.append(optax.softmax_cross_entropy_with_integer_labels(lg, attrs[:, i]))
    ce = jnp.stack(ce, -1)
    attr_loss = jnp.sum(ce * weights) / jnp.maximum(jnp.sum(weights), 1.0)
    return MOTION_LOSS_WEIGHT * motion_loss + attr_loss, (motion_loss, attr_loss)


def train_probe(steps: int = 5000, batch: int = 64, pool: int = 48000, seed: int = 0,
                lr: float = 3e-3, log=print, init: pb.ProbeNet | None = None,
                mouth_weight: float = 4.0,
                hires_fraction: float = 0.25) -> tuple[pb.ProbeNet, dict[str, Any]]:
    """Train from scratch (or continue from ``init``); returns the network and a record."""
    rng = np.random.default_rng(seed)
    t0 = time.time()
    frames, motion, attrs = render_examples(rng, pool, hires_fraction=hires_fraction)
    render_s = time.time() - t0
    log(f"rendered {pool} training frames in {render_s:.0f} s")
    model = init if init is not None else pb.make_probe_net(seed=seed)
    weights = jnp.asarray(motion_weights(mouth_weight))
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(200, steps // 10), steps, lr * 0.02)
    opt = nnx.Optimizer(model, optax.adamw(schedule, weight_decay=1e-4), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, f, m, a):
        (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, f, m, a, weights)
        opt.update(model, grads)
        return loss, aux

    t1 = time.time()
    for i in range(steps):
        idx = rng.integers(0, pool, batch)
        f = frames[idx]
        if rng.random() < 0.5:  # brightness jitter: generated video is never exact
            f = np.clip(f.astype(np.int16) + rng.integers(-12, 13), 0, 255).astype(np.uint8)
        f = _shift(f, rng)
        loss, (ml, al) = step(model, opt, jnp.asarray(f), jnp.asarray(motion[idx]),
                              jnp.asarray(attrs[idx]))
        if i % 100 == 0 or i == steps - 1:
            log(f"step {i:5d}  loss {float(loss):.4f}  motion {float(ml):.5f}  "
                f"attributes {float(al):.4f}  ({time.time() - t1:.0f} s)")
    record = {"steps": steps, "batch": batch, "pool": pool, "seed": seed, "lr": lr,
              "mouth_weight": mouth_weight, "hires_fraction": hires_fraction,
              "render_seconds": round(render_s, 1), "train_seconds": round(time.time() - t1, 1)}
    return model, record


def r2_score(pred: np.ndarray, true: np.ndarray) -> float:
    ss_res = float(((pred - true) ** 2).sum())
    ss_tot = float(((true - true.mean()) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def _attribute_hits(pred: np.ndarray, true: np.ndarray, motion: np.ndarray):
    """Per attribute: (correct, counted) over the frames that can show it."""
    vis = mo.attribute_visibility(motion)
    hits, counts = np.zeros(idn.NUM_ATTRIBUTES), np.zeros(idn.NUM_ATTRIBUTES)
    for a, name in enumerate(idn.ATTRIBUTE_NAMES):
        sel = vis.get(name, np.ones(len(motion), bool))
        hits[a] += (pred[sel, a] == true[sel, a]).sum()
        counts[a] += sel.sum()
    return hits, counts


def _summary(hits, counts, pred, true) -> dict[str, Any]:
    r2 = {n: r2_score(pred[:, j], true[:, j]) for j, n in enumerate(mo.MOTION_FIELDS)}
    acc = {n: (float(h / c) if c else float("nan"))
           for n, h, c in zip(idn.ATTRIBUTE_NAMES, hits, counts)}
    return {"frames": int(pred.shape[0]), "motion_r2": r2, "attribute_accuracy": acc,
            "attribute_frames": {n: int(c) for n, c in zip(idn.ATTRIBUTE_NAMES, counts)},
            "mean_attribute_accuracy": float(hits.sum() / counts.sum()),
            "min_attribute_accuracy": float(min(v for v in acc.values() if v == v)),
            "mouth_open_mae": float(np.abs(pred[:, 0] - true[:, 0]).mean())}


def evaluate_clips(probe: pb.Probe, num_clips: int = 12, duration_s: float = 2.0,
                   resolution: int = 64, seed: int = 1000,
                   languages: tuple[str, ...] = ("en", "de", "es", "fr", "zh", "hi"),
                   speech_backend: str = "auto") -> dict[str, Any]:
    """Speech-driven clips of held-out identities in held-out scenes."""
    ids = idn.ids_in_split("heldout", num_clips)
    scenes = idn.ids_in_split("heldout", num_clips + 3)[3:]
    preds, trues = [], []
    hits, counts, clip_hits, clip_counts = (np.zeros(idn.NUM_ATTRIBUTES) for _ in range(4))
    for k, (i, s) in enumerate(zip(ids, scenes)):
        clip = make_clip(seed + k, i, s, languages[k % len(languages)], duration_s, resolution,
                         speech_backend=speech_backend)
        r = probe.read(clip.frames)
        preds.append(r.motion)
        trues.append(clip.motion)
        h, c = _attribute_hits(r.attributes(), np.broadcast_to(clip.static_attributes,
                                                               (clip.num_frames, idn.NUM_ATTRIBUTES)),
                               clip.motion)
        hits += h
        counts += c
        # clip level: only the attributes the clip shows in at least one frame (a 2-s clip
        # often never turns the head far enough to show the side mark)
        shown = c > 0
        clip_hits += shown & (probe.read_clip(clip.frames).attributes == clip.static_attributes)
        clip_counts += shown
    out = _summary(hits, counts, np.concatenate(preds), np.concatenate(trues))
    out.update(num_clips=num_clips, resolution=resolution,
               clip_attribute_accuracy=float(clip_hits.sum() / clip_counts.sum()),
               clip_attributes_counted=int(clip_counts.sum()))
    return out


def evaluate_posed(probe: pb.Probe, num_frames: int = 2048, seed: int = 2000) -> dict[str, Any]:
    """Held-out identities in held-out scenes under random poses over the whole motion range
    (so the teeth and the side mark are seen often enough to be counted)."""
    frames, motion, attrs = render_examples(np.random.default_rng(seed), num_frames, "heldout")
    r = probe.read(frames)
    hits, counts = _attribute_hits(r.attributes(), attrs, motion)
    return _summary(hits, counts, r.motion, motion)


def evaluate_probe(probe: pb.Probe, num_clips: int = 24, posed_frames: int = 2048,
                   speech_backend: str = "auto") -> dict[str, Any]:
    """The accuracy table of docs/avatarworld.md."""
    return {"clips_64px": evaluate_clips(probe, num_clips, speech_backend=speech_backend),
            "clips_128px": evaluate_clips(probe, max(4, num_clips // 3), resolution=128,
                                          seed=3000, speech_backend=speech_backend),
            "posed_64px": evaluate_posed(probe, posed_frames)}


def _parse_strides(text: str | None, parser: argparse.ArgumentParser):
    if text is None:
        return None
    try:
        strides = tuple(int(t) for t in text.split(","))
    except ValueError:
        parser.error(f"--strides must be comma-separated integers, got {text!r}")
    if len(strides) != 5 or any(s not in (1, 2) for s in strides) or int(np.prod(strides)) != 16:
        parser.error(f"--strides must be five strides of 1 or 2 that downsample by 16 "
                     f"(64 px -> 4 x 4), got {text!r}")
    return strides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--pool", type=int, default=48000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--mouth-weight", type=float, default=4.0,
                        help="loss weight of mouth_open against 1 for the other motion fields")
    parser.add_argument("--hires-fraction", type=float, default=0.25,
                        help="share of training frames rendered at 128 px and box-averaged "
                             "(what the probe does to larger frames)")
    parser.add_argument("--init", default=None, help="continue training from these weights")
    parser.add_argument("--strides", default=None,
                        help="conv strides, comma-separated (default: the --init file's, or "
                             "1,2,2,2,2); with --init the weights carry over (same shapes)")
    parser.add_argument("--out", default=pb.ASSET_PATH)
    parser.add_argument("--eval-clips", type=int, default=24)
    parser.add_argument("--eval-only", action="store_true", help="evaluate the weights at --out")
    parser.add_argument("--report", default=None, help="write the evaluation as JSON here")
    args = parser.parse_args(argv)
    if not 0.0 <= args.hires_fraction <= 1.0:
        parser.error(f"--hires-fraction must be in [0, 1], got {args.hires_fraction}")
    if args.eval_only:
        probe = pb.load_probe(args.out)
        record = probe.meta
    else:
        strides = _parse_strides(args.strides, parser)
        init = pb.load_probe(args.init).model if args.init else None
        if init is not None and strides is not None and strides != init.strides:
            init = pb.with_strides(init, strides)
        elif init is None and strides is not None:
            init = pb.make_probe_net(strides=strides, seed=args.seed)
        model, record = train_probe(args.steps, args.batch, args.pool, args.seed, args.lr,
                                    init=init, mouth_weight=args.mouth_weight,
                                    hires_fraction=args.hires_fraction)
        if args.init:
            record = {"continued_from": pb.load_probe(args.init).meta, **record}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        pb.save_probe(model, args.out, meta=record)
        probe = pb.load_probe(args.out)
    report = {"training": record, "heldout": evaluate_probe(probe, args.eval_clips)}
    text = json.dumps(report, indent=1)
    print(text)
    if args.report:
        tmp = args.report + ".partial"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, args.report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
