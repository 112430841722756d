"""What the trained stages learned, measured with the AvatarWorld probe on held-out data.

    python benchmarks/avatarworld_learning.py --heldout /tmp/awl/heldout \
        --checkpoint a2v=/tmp/awl/runs/a2v --checkpoint sft=/tmp/awl/runs/sft

``--heldout`` is a shard set written with ``--split heldout`` (people and scenes never seen in
training). For each held-out person with two clips, the first clip is the reference (its first
``cfg.inference.ref_frames`` frames, its own speech and, for a motion model, its true motion)
and the second clip's speech drives the output, so the speech is held out too. Each model
generates through ``avatarv_jax.inference.Pipeline`` (chunked guided sampling, streaming VAE
decode: what ``infer.py`` does) and ``data/avatarworld/metrics.score_clip`` scores the frames
against the driving audio and the person's true attributes and style.

Rows: ``random`` (fresh weights of the last checkpoint's config), one per ``--checkpoint``,
and two ceilings that need no DiT: ``ground_truth`` (the driving clip's real frames: what the
probe itself reaches) and ``vae_reconstruction`` (those frames through the last checkpoint's
frozen VAE, encode then decode: no DiT on that VAE can do better than its decoder allows; the
report names that checkpoint under ``config_of``). ``--vae NAME=FILE``
adds the same ceiling for a pre-trained VAE file of any shape (``vae_pretrain --out``), so a
VAE can be judged before a chain is trained on it; given without ``--checkpoint``, only the
ceilings are measured. Writes ``benchmarks/results/avatarworld_learning.json``.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from avatarv_jax.data.avatarworld import metrics
from avatarv_jax.data.avatarworld import motion as mo
from avatarv_jax.data.avatarworld import probe as probe_lib
from avatarv_jax.data.avatarworld.shards import AvatarWorldDataset
from avatarv_jax.diffusion.guidance import num_guidance_passes
from avatarv_jax.inference import chunks as chunking, media, motion_source, weights
from avatarv_jax.inference.pipeline import Pipeline, Prepared, Job, resolve_config
from avatarv_jax.models import factory
from avatarv_jax.tools.bench_io import host_info, write_json
from avatarv_jax.training.vae_pretrain import load_vae_file

SPF = 640
HEADLINE = ("lip_sync_corr", "silence_closed_fraction", "silence_mean_open",
            "attribute_agreement", "embedding_similarity", "style_match")
TARGETS = {"lip_sync_corr": 0.6, "attribute_agreement": 0.9}
VAE_FIGURES = ("psnr_db", "mouth_error_closed", "mouth_error_open")


def eval_pairs(dataset: AvatarWorldDataset, max_pairs: int):
    """(reference clip, driving clip) of the same held-out person, one pair per person."""
    by_person = defaultdict(list)
    for i in range(len(dataset)):
        clip = dataset[i]
        by_person[int(clip.identity_id)].append(clip)
    pairs = [(clips[0], clips[1]) for _, clips in sorted(by_person.items()) if len(clips) >= 2]
    if not pairs:
        raise SystemExit("error: the held-out set has no person with two clips; write it with "
                         "--identities <= clips / 2")
    return pairs[:max_pairs]


def prepared(cfg, ref, drive, *, steps: int | None,
             guidance: tuple[float, float] | None = None) -> Prepared:
    """The job ``infer.py`` would prepare from the reference clip and the driving speech, built
    from the clips directly (no lossy mp4 round trip); the reference motion is the truth."""
    s = cfg.inference
    t = min(int(s.ref_frames), ref.frames.shape[0])
    t = 1 + 4 * ((t - 1) // 4)
    motion_dim = int(cfg.model.get("motion_dim", 0))
    motion = (motion_source.ReferenceMotion(np.asarray(ref.motion[:t], np.float32),
                                            "avatarworld:truth") if motion_dim else
              motion_source.ReferenceMotion(np.zeros((t, 0), np.float32), "none"))
    wave = np.asarray(drive.audio, np.float32)
    return Prepared(
        job=Job(reference="<avatarworld>", output="<memory>"), size=tuple(s.resolution),
        audio=media.AudioTrack.from_wave(wave), num_frames=drive.frames.shape[0],
        ref_frames=ref.frames[:t], ref_audio=np.asarray(ref.audio[:t * SPF], np.float32),
        ref_has_audio=True, ref_motion=motion, prompt=ref.caption,
        steps=int(steps or cfg.sampling.num_steps),
        text_scale=float(guidance[0] if guidance else cfg.sampling.text_scale),
        audio_scale=float(guidance[1] if guidance else cfg.sampling.audio_scale))


def score(probe, frames, ref, drive) -> dict:
    ref_embedding = probe.read_clip(ref.frames).embedding
    return metrics.score_clip(probe, frames, drive.audio,
                              reference_attributes=ref.static_attributes,
                              reference_embedding=ref_embedding,
                              reference_style=ref.dynamic_style)


def summarise(rows: list[dict]) -> dict:
    out = {}
    for key in HEADLINE:
        values = np.asarray([r[key] for r in rows if key in r], np.float64)
        values = values[np.isfinite(values)]
        if values.size:
            out[key] = float(values.mean())
            out[key + "_std"] = float(values.std())
    for key in ("seconds", "network_evaluations", "sampling_steps"):
        values = [r[key] for r in rows if key in r]
        if values:
            out[key + "_per_video"] = float(np.mean(values))
    for key in VAE_FIGURES:
        values = [r[key] for r in rows if key in r]
        if values:
            out[key] = float(np.mean(values))
    out["num_clips"] = len(rows)
    return out


def load_pipeline(name: str, checkpoint: str | None, base_cfg):
    if checkpoint is None:       # fresh weights of the config (the factory's initialisers)
        cfg = base_cfg
        models = factory.build_models(cfg, seed=0)
        info = weights.WeightsInfo("random")
    else:
        cfg = resolve_config(None, checkpoint)
        models = factory.build_models(cfg, seed=0)
        info = weights.load_weights(models, checkpoint, log=lambda m: None)
    return Pipeline(cfg, models, info, log=lambda m: None)


def network_evaluations(pipe: Pipeline, prep: Prepared) -> int:
    """DiT passes to generate one video: chunks x steps x guidance passes (one for a
    guidance-distilled DiT; Heun doubles the steps' passes)."""
    s = pipe.settings
    chunks = len(chunking.plan_chunks(prep.num_frames, s.chunk_latents, s.prefix_latents).chunks)
    passes = (1 if pipe.dit.cfg.guidance_embed
              else num_guidance_passes(prep.text_scale, prep.audio_scale))
    per_step = 2 if pipe.cfg.sampling.method == "heun" else 1
    return chunks * int(prep.steps) * passes * per_step


def run_model(pipe: Pipeline, pairs, probe, *, steps, guidance=None) -> list[dict]:
    rows = []
    for ref, drive in pairs:
        prep = prepared(pipe.cfg, ref, drive, steps=steps, guidance=guidance)
        t0 = time.perf_counter()
        frames = np.concatenate(list(pipe.frames(prep)), axis=0)
        row = score(probe, frames, ref, drive)
        row.update(seconds=time.perf_counter() - t0, sampling_steps=int(prep.steps),
                   network_evaluations=network_evaluations(pipe, prep))
        rows.append(row)
    return rows


def vae_roundtrip(vae, frames: np.ndarray) -> np.ndarray:
    video = jnp.asarray(frames[None], jnp.float32) / 127.5 - 1.0
    out = jax.jit(lambda v: vae.decode(vae.encode(v)))(video)
    return np.asarray(jnp.round((out[0] + 1.0) * 127.5).clip(0, 255).astype(jnp.uint8))


def vae_ceiling(vae, pairs, probe) -> list[dict]:
    """The probe's scores of the driving clips encoded and decoded by ``vae`` (no DiT), with
    the PSNR and how far the probe's mouth reading moves from its reading of the real frames
    (squared), apart on frames whose true mouth is closed and open: a VAE that blurs the
    mouth loses the open ones."""
    rows = []
    for ref, drive in pairs:
        out = vae_roundtrip(vae, drive.frames)
        row = score(probe, out, ref, drive)
        err = (mo.field(probe.read(out).motion, "mouth_open")
               - mo.field(probe.read(drive.frames).motion, "mouth_open")) ** 2
        closed = mo.field(np.asarray(drive.motion), "mouth_open") < metrics.CLOSED_BELOW
        mse = np.mean((out.astype(np.float64) - drive.frames) ** 2)
        row["psnr_db"] = 10 * np.log10(255.0 ** 2 / max(mse, 1e-12))
        if closed.any():
            row["mouth_error_closed"] = float(err[closed].mean())
        if not closed.all():
            row["mouth_error_open"] = float(err[~closed].mean())
        rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--heldout", required=True, help="held-out AvatarWorld shard set")
    parser.add_argument("--checkpoint", action="append", default=[],
                        help="NAME=PATH of a trainer workdir or step (repeatable)")
    parser.add_argument("--vae", action="append", default=[],
                        help="NAME=FILE of a pre-trained VAE (vae_pretrain --out): its "
                             "reconstruction ceiling as a row of its own (repeatable; alone, "
                             "without --checkpoint, only the ceilings are measured)")
    parser.add_argument("--pairs", type=int, default=8, help="held-out people to generate")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (config's)")
    parser.add_argument("--steps-for", action="append", default=[],
                        help="NAME=N: sampling steps of one checkpoint (repeatable; e.g. a "
                             "teacher at many steps beside its 4-step student)")
    parser.add_argument("--guidance", default=None, metavar="TEXT,AUDIO",
                        help="guidance scales for every checkpoint (default: each config's; "
                             "1,1 samples unguided)")
    parser.add_argument("--compute", default="", help="free text: the training compute used")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" /
                                             "avatarworld_learning.json"))
    args = parser.parse_args(argv)

    named = []
    for item in args.checkpoint:
        name, eq, path = item.partition("=")
        if not eq or not name or not Path(path).is_dir():
            print(f"error: --checkpoint must be NAME=DIRECTORY, got {item!r}", file=sys.stderr)
            return 2
        named.append((name, path))
    vae_files, vaes = [], {}
    for item in args.vae:
        name, eq, path = item.partition("=")
        if not eq or not name or name in vaes or not Path(path).is_file():
            print(f"error: --vae must be NAME=FILE of a pre-trained VAE, each NAME once, "
                  f"got {item!r}", file=sys.stderr)
            return 2
        try:
            vaes[name] = load_vae_file(path)
        except (ValueError, OSError) as e:
            print(f"error: --vae {item}: {e}", file=sys.stderr)
            return 2
        vae_files.append((name, path))
    steps_for = {}
    for item in args.steps_for:
        name, eq, n = item.partition("=")
        if not eq or name not in dict(named) or not n.isdigit() or int(n) < 1:
            print(f"error: --steps-for must be NAME=N for a --checkpoint NAME, got {item!r}",
                  file=sys.stderr)
            return 2
        steps_for[name] = int(n)
    guidance = None
    if args.guidance is not None:
        try:
            guidance = tuple(float(v) for v in args.guidance.split(","))
        except ValueError:
            guidance = ()
        if len(guidance) != 2:
            print(f"error: --guidance must be TEXT,AUDIO (two numbers), got {args.guidance!r}",
                  file=sys.stderr)
            return 2
    if not (Path(args.heldout) / "manifest.json").is_file():
        print(f"error: {args.heldout} is not an AvatarWorld shard set (no manifest.json)",
              file=sys.stderr)
        return 2

    dataset = AvatarWorldDataset(args.heldout)
    pairs = eval_pairs(dataset, args.pairs)
    probe = probe_lib.load_probe()
    results, per_clip, timings = {}, {}, {}

    truth = [score(probe, drive.frames, ref, drive) for ref, drive in pairs]
    results["ground_truth"] = summarise(truth)
    per_clip["ground_truth"] = truth

    base_cfg = resolve_config(None, named[-1][1]) if named else None
    if base_cfg is None:
        from avatarv_jax.training.stage_config import stage_config
        base_cfg = stage_config("sft", "tiny")
    models = ([("random", None)] if named or not vae_files else []) + named
    for name, path in models:
        t0 = time.perf_counter()
        pipe = load_pipeline(name, path, base_cfg)
        rows = run_model(pipe, pairs, probe, steps=steps_for.get(name, args.steps),
                         guidance=guidance)
        results[name], per_clip[name] = summarise(rows), rows
        timings[name + "_s"] = time.perf_counter() - t0
        print(f"{name}: " + ", ".join(f"{k} {results[name][k]:.3f}" for k in HEADLINE
                                      if k in results[name]), flush=True)
        if path is not None and name == named[-1][0]:
            recon = vae_ceiling(pipe.models["vae"], pairs, probe)
            results["vae_reconstruction"] = summarise(recon)
            per_clip["vae_reconstruction"] = recon
    for name, path in vae_files:
        recon = vae_ceiling(vaes[name], pairs, probe)
        results[f"vae_reconstruction:{name}"] = summarise(recon)
        per_clip[f"vae_reconstruction:{name}"] = recon
    for name in ["ground_truth", "vae_reconstruction"] + [f"vae_reconstruction:{n}"
                                                          for n, _ in vae_files]:
        if name in results:
            print(f"{name}: " + ", ".join(f"{k} {results[name][k]:.3f}"
                                          for k in HEADLINE + VAE_FIGURES
                                          if k in results[name]), flush=True)

    report = {
        "benchmark": "avatarworld_learning",
        "host": host_info(),
        "heldout": str(args.heldout),
        "pairs": [{"reference_identity": int(r.identity_id), "reference_scene": int(r.scene_id),
                   "driving_scene": int(d.scene_id), "frames": int(d.frames.shape[0])}
                  for r, d in pairs],
        "checkpoints": dict(named),
        "config_of": named[-1][0] if named else None,   # the random row's and the VAE row's
        "vaes": dict(vae_files),
        "compute": args.compute,
        "guidance": list(guidance) if guidance else "config",
        "steps": args.steps or "config",
        "targets": {"lip_sync_corr": ">= 0.6", "attribute_agreement": ">= 0.9",
                    "style_match": "sft > a2v"},
        "results": results,
        "per_clip": per_clip,
        "timings": timings,
    }
    print("wrote", write_json(report, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
