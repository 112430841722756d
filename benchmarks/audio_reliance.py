"""Does a trained DiT use its audio? The flow loss with each clip's own audio against the same
batch with the audio of another clip (rolled by one in the batch) and with silence.

    python benchmarks/audio_reliance.py --checkpoint runs/sft --batches 10

Same noise, noise levels and clean prefix for the three variants; no condition dropout. Two
losses: the video term as the stage trains it (region-weighted by its ``flow`` config) and a
mouth-dominated one (mouth weight 1000, face and eye 0), where lip sync would show first. A
model that ignores the audio gives the same loss for all three; one that lip-syncs pays for
the wrong clip's audio. Reads the run's own ``config.json`` (stage, data, presets) and its EMA
weights; ``--shards`` points it at another shard set (e.g. held-out speech).
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
        return out

    values: dict[str, list[float]] = {}
    data = iter(make_data(cfg))
    for i in range(batches):
        batch = {k: jnp.asarray(v) for k, v in next(data).items()
                 if np.asarray(v).dtype.kind in "biuf"}
        for d in range(draws):
            for k, v in losses(batch, jax.random.key(seed + 1000 * i + d)).items():
                values.setdefault(k, []).append(float(v))
    report = {}
    for kind in ("trained", "mouth"):
        own = np.asarray(values[f"{kind}/own"])
        row = {"own": float(own.mean())}
        for name in VARIANTS[1:]:
            diff = np.asarray(values[f"{kind}/{name}"]) - own
            row[name] = float(np.mean(values[f"{kind}/{name}"]))
            row[f"{name}_minus_own"] = float(diff.mean())
            row[f"{name}_minus_own_sem"] = float(diff.std() / np.sqrt(diff.size))
            row[f"{name}_relative"] = float(diff.mean() / own.mean())
        report[kind] = row
    report["evaluations"] = len(values["trained/own"])
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a trainer workdir (with config.json)")
    parser.add_argument("--shards", default=None, help="shard set (default: the run's own)")
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--draws", type=int, default=4, help="noise draws per batch")
    parser.add_argument("--batch-size", type=int, default=8)
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
    if args.shards:
        cfg.data.shards = args.shards
    cfg.data.batch_size = args.batch_size
    cfg.train.synthetic_data = False
    from absl import flags
    flags.FLAGS.mark_as_parsed()          # Grain workers read absl flags outside app.run

    models = factory.build_models(cfg, seed=0)
    info = weights.load_weights(models, args.checkpoint, log=lambda m: None)
    report = measure(cfg, models, args.batches, args.draws)
    for kind in ("trained", "mouth"):
        r = report[kind]
        print(f"{kind} loss: own {r['own']:.5f}; other clip's audio "
              f"{r['other_clip_minus_own']:+.5f} +- {r['other_clip_minus_own_sem']:.5f} "
              f"({100 * r['other_clip_relative']:+.2f} %); silence "
              f"{r['silence_minus_own']:+.5f} +- {r['silence_minus_own_sem']:.5f} "
              f"({100 * r['silence_relative']:+.2f} %)")
    write_json({"benchmark": "audio_reliance", "host": host_info(),
                "checkpoint": str(args.checkpoint), "step": info.step, "stage": cfg.stage,
                "shards": str(cfg.data.shards), "batch_size": args.batch_size,
                "batches": args.batches, "draws": args.draws, **report}, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
