"""Does a trained DiT use its audio? The flow loss with each clip's own audio against the same
batch with the audio of another clip (rolled by one in the batch) and with silence.

    python benchmarks/audio_reliance.py --checkpoint runs/sft --batches 10

Same noise, noise levels and clean prefix for the three variants; no condition dropout. Two
losses: the video term as the stage trains it (region-weighted by its ``flow`` config) and a
mouth-dominated one (mouth weight 1000, face and eye 0), where lip sync would show first, and
the motion stream's term (its ``mouth_open`` channel is the lips). A
model that ignores the audio gives the same loss for all three; one that lip-syncs pays for
the wrong clip's audio. Reads the run's own ``config.json`` (stage, data, presets) and its EMA
weights; ``--shards`` points it at another shard set (e.g. held-out speech).

``--avatarworld-probe SHARDS`` also asks whether the frozen audio encoder's features carry the
lips at all: a ridge regression from the features of frames t-2..t+2 to AvatarWorld's true
``mouth_open`` of frame t, fitted on the first 80 % of the clips and scored (R^2, correlation)
on the rest, next to the same regression from the waveform's log RMS energy. ``--lip-error``
measures what the lips drawn in the clean-video estimate ``x_t - sigma v`` say: stage 3's
lip-sync aux loss (probe-read mouth opening against the decoded truth) at fixed noise levels,
with each of the three audios.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from avatarv_jax.diffusion.guidance import ConditionDropout
from avatarv_jax.diffusion.objective import flow_matching_loss
from avatarv_jax.inference import weights
from avatarv_jax.models import factory
from avatarv_jax.tools.bench_io import host_info, write_json
from avatarv_jax.training.batch import encode_batch
from avatarv_jax.training.stage_config import data_stage
from avatarv_jax.training.trainer import make_data

VARIANTS = ("own", "other_clip", "silence")


def _collect(cfg, fn, batches: int, draws: int, seed: int) -> dict[str, list[float]]:
    """``fn(batch, key) -> {name: scalar}`` over ``batches`` training batches x ``draws`` keys."""
    values: dict[str, list[float]] = {}
    data = iter(make_data(cfg))
    for i in range(batches):
        batch = {k: jnp.asarray(v) for k, v in next(data).items()
                 if np.asarray(v).dtype.kind in "biuf"}
        for d in range(draws):
            for k, v in fn(batch, jax.random.key(seed + 1000 * i + d)).items():
                values.setdefault(k, []).append(float(v))
    return values


def _compare(values: dict[str, list[float]], prefix: str) -> dict:
    """Mean with own audio; each other variant's mean, paired difference, its standard error
    and the difference relative to own."""
    own = np.asarray(values[f"{prefix}/own"])
    row = {"own": float(own.mean())}
    for name in VARIANTS[1:]:
        other = np.asarray(values[f"{prefix}/{name}"])
        diff = other - own
        row[name] = float(other.mean())
        row[f"{name}_minus_own"] = float(diff.mean())
        row[f"{name}_minus_own_sem"] = float(diff.std() / np.sqrt(diff.size))
        row[f"{name}_relative"] = float(diff.mean() / own.mean())
    return row


def measure(cfg, models, batches: int, draws: int, seed: int = 0) -> dict:
    frozen = {k: models[k] for k in ("text_encoder", "audio_encoder", "vae")}
    stage = data_stage(cfg.stage)
    trained_flow = cfg.flow
    mouth_flow = ml_collections.ConfigDict(dict(cfg.flow.to_dict(), face_weight=0.0,
                                                eye_weight=0.0, mouth_weight=1000.0))
    keep_all = ConditionDropout(0.0, 0.0, 0.0, 0.0)
    prefix = int(cfg.train.num_prefix_frames)

    @jax.jit
    def losses(batch, key):
        tb = encode_batch(frozen, batch, stage)
        audio = {"own": tb.audio, "other_clip": jnp.roll(tb.audio, 1, axis=0),
                 "silence": jnp.zeros_like(tb.audio)}
        out = {}
        for name in VARIANTS:
            for kind, flow in (("trained", trained_flow), ("mouth", mouth_flow)):
                _, terms = flow_matching_loss(models["dit"], tb.replace(audio=audio[name]), key,
                                              flow_cfg=flow, dropout=keep_all, num_prefix=prefix)
                out[f"{kind}/{name}"] = terms["video"]
                if kind == "trained" and tb.motion is not None:
                    out[f"motion/{name}"] = terms["motion"]
        return out

    values = _collect(cfg, losses, batches, draws, seed)
    report = {}
    for kind in ("trained", "mouth", "motion"):
        if f"{kind}/own" not in values:
            continue
        report[kind] = _compare(values, kind)
    report["evaluations"] = len(values["trained/own"])
    return report


LIP_SIGMAS = (0.2, 0.5, 0.8)


def measure_lip_error(cfg, models, batches: int, draws: int, seed: int = 0) -> dict:
    """Stage 3's lip-sync aux loss (``training/aux_losses.py``) of the clean-video estimate at
    fixed noise levels, with own / another clip's / no audio: does the mouth the DiT draws
    follow the speech? (AvatarWorld sft runs only: the probe reads the frames.)"""
    from avatarv_jax.posttrain.rewards import ProbeRewards
    from avatarv_jax.training.aux_losses import ProbeAuxLosses
    frozen = {k: models[k] for k in ("text_encoder", "audio_encoder", "vae")}
    keep_all = ConditionDropout(0.0, 0.0, 0.0, 0.0)
    prefix = int(cfg.train.num_prefix_frames)
    probe = ProbeRewards()
    flows = {s: ml_collections.ConfigDict(dict(cfg.flow.to_dict(), logit_std=0.0, shift=0.0,
                                               logit_mean=float(np.log(s / (1 - s)))))
             for s in LIP_SIGMAS}

    @jax.jit
    def errors(batch, key):
        tb = encode_batch(frozen, batch, "sft")
        aux = ProbeAuxLosses({"lip_sync": 1.0}, 1.0, frozen["vae"].decode, batch, probe=probe)
        audio = {"own": tb.audio, "other_clip": jnp.roll(tb.audio, 1, axis=0),
                 "silence": jnp.zeros_like(tb.audio)}
        out = {}
        for s, flow in flows.items():
            for name in VARIANTS:
                _, terms = flow_matching_loss(models["dit"], tb.replace(audio=audio[name]), key,
                                              flow_cfg=flow, dropout=keep_all,
                                              num_prefix=prefix, aux_fn=aux)
                out[f"{s}/{name}"] = terms["aux_lip_sync"]
        return out

    values = _collect(cfg, errors, batches, draws, seed)
    return {f"sigma_{s}": _compare(values, str(s)) for s in LIP_SIGMAS}


def _with_context(x: np.ndarray, k: int = 2) -> np.ndarray:
    padded = np.pad(x, ((k, k), (0, 0)), mode="edge")
    return np.concatenate([padded[j:j + len(x)] for j in range(2 * k + 1)], axis=1)


def _ridge_r2(features: list[np.ndarray], targets: list[np.ndarray]) -> dict:
    """Held-out R^2 and correlation of a ridge fit (first 80 % of the clips -> the rest)."""
    xs = [_with_context(f) for f in features]
    cut = int(len(xs) * 0.8)
    a, b = np.concatenate(xs[:cut]), np.concatenate(targets[:cut])
    at, bt = np.concatenate(xs[cut:]), np.concatenate(targets[cut:])
    mu, sd = a.mean(0), a.std(0) + 1e-6
    a = np.c_[(a - mu) / sd, np.ones(len(a))]
    at = np.c_[(at - mu) / sd, np.ones(len(at))]
    w = np.linalg.solve(a.T @ a + np.eye(a.shape[1]), a.T @ b)
    pred = at @ w
    return {"r2": float(1 - np.mean((pred - bt) ** 2) / bt.var()),
            "corr": float(np.corrcoef(pred, bt)[0, 1]), "clips_fit": cut,
            "clips_scored": len(xs) - cut}


def audio_feature_probe(encoder, shards: str) -> dict:
    """Do the audio encoder's per-frame features predict the true mouth opening?"""
    from avatarv_jax.data.avatarworld import motion as motion_fields
    from avatarv_jax.data.avatarworld.shards import AvatarWorldDataset

    dataset = AvatarWorldDataset(shards)
    encode = jax.jit(lambda wave: encoder(wave[None])[0])
    feats, energy, mouth = [], [], []
    for i in range(len(dataset)):
        clip = dataset[i]
        t = clip.frames.shape[0]
        spf = clip.audio.shape[0] // t
        feats.append(np.asarray(encode(jnp.asarray(clip.audio)))[:t])
        frames = clip.audio[:t * spf].reshape(t, spf)
        energy.append(np.log(np.sqrt((frames ** 2).mean(1)) + 1e-4)[:, None])
        mouth.append(motion_fields.field(clip.motion, "mouth_open")[:t])
    return {"shards": shards, "audio_encoder_features": _ridge_r2(feats, mouth),
            "log_rms_energy": _ridge_r2(energy, mouth)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a trainer workdir (with config.json)")
    parser.add_argument("--shards", default=None, help="shard set (default: the run's own)")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--draws", type=int, default=4, help="noise draws per batch")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--avatarworld-probe", default=None, metavar="SHARDS",
                        help="also fit the audio features to AvatarWorld's true mouth opening")
    parser.add_argument("--lip-error", action="store_true",
                        help="also the probe-read mouth error of the clean-video estimate at "
                             f"sigma {LIP_SIGMAS} (AvatarWorld sft runs)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "audio_reliance.json"))
    args = parser.parse_args(argv)
    config = Path(args.checkpoint) / "config.json"
    if not config.is_file():
        print(f"error: {args.checkpoint} has no config.json (need a trainer workdir)",
              file=sys.stderr)
        return 2
    if min(args.batches, args.draws) < 1 or args.batch_size < 2:
        print("error: --batches and --draws must be >= 1, --batch-size >= 2", file=sys.stderr)
        return 2
    cfg = ml_collections.ConfigDict(json.loads(config.read_text()))
    if data_stage(cfg.stage) not in ("a2v", "sft") or not cfg.model.audio_dim:
        print(f"error: stage {cfg.stage} has no audio condition", file=sys.stderr)
        return 2
    if args.lip_error and data_stage(cfg.stage) != "sft":
        print("error: --lip-error needs an sft run (AvatarWorld motion)", file=sys.stderr)
        return 2
    if args.shards:
        cfg.data.shards = args.shards
    cfg.data.batch_size = args.batch_size
    cfg.train.synthetic_data = False
    from absl import flags
    flags.FLAGS.mark_as_parsed()          # Grain workers read absl flags outside app.run

    models = factory.build_models(cfg, seed=0)
    info = weights.load_weights(models, args.checkpoint, log=lambda m: None)
    report = measure(cfg, models, args.batches, args.draws)
    for kind in ("trained", "mouth", "motion"):
        if kind not in report:
            continue
        r = report[kind]
        print(f"{kind} loss: own {r['own']:.5f}; other clip's audio "
              f"{r['other_clip_minus_own']:+.5f} +- {r['other_clip_minus_own_sem']:.5f} "
              f"({100 * r['other_clip_relative']:+.2f} %); silence "
              f"{r['silence_minus_own']:+.5f} +- {r['silence_minus_own_sem']:.5f} "
              f"({100 * r['silence_relative']:+.2f} %)")
    if args.lip_error:
        report["lip_error"] = measure_lip_error(cfg, models, args.batches, args.draws)
        for s, r in report["lip_error"].items():
            print(f"lip error of the estimate at {s}: own {r['own']:.4f}; other clip's audio "
                  f"{100 * r['other_clip_relative']:+.1f} % "
                  f"(+-{100 * r['other_clip_minus_own_sem'] / r['own']:.1f}); silence "
                  f"{100 * r['silence_relative']:+.1f} %")
    if args.avatarworld_probe:
        report["audio_feature_probe"] = audio_feature_probe(models["audio_encoder"],
                                                            args.avatarworld_probe)
        for name, r in report["audio_feature_probe"].items():
            if isinstance(r, dict):
                print(f"mouth opening from {name}: held-out R^2 {r['r2']:.3f}, "
                      f"corr {r['corr']:.3f}")
    write_json({"benchmark": "audio_reliance", "host": host_info(),
                "checkpoint": str(args.checkpoint), "step": info.step, "stage": cfg.stage,
                "shards": str(cfg.data.shards), "batch_size": args.batch_size,
                "batches": args.batches, "draws": args.draws, **report}, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
