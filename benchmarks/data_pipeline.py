"""Input-pipeline speed: SFT examples/s (pixels and latents) and identity-graph build time.

    python benchmarks/data_pipeline.py            # prints, saves benchmarks/results/data_pipeline.json
    python benchmarks/data_pipeline.py --quick    # a smoke run

The SFT pipeline reads an AvatarWorld set written at ``--resolution`` (default 128 px; 17-frame
targets, 5-frame references from other clips of the person, masks, motion, audio, tokenised
captions) with 0 and ``--workers`` Grain worker processes; the latent run reads the same clips
pre-encoded by the tiny VAE (random weights: reading cost does not depend on them; the latents
have the Wan 2.1 shape, 16 channels at 1/8 of the side). The graph build times
``build_identity_graph`` on synthetic clips (128-d face embeddings like dlib's, clustered by
person; one background vector per scene) with each nearest-neighbour index.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

from avatarv_jax.data import identity_graph as ig
from avatarv_jax.data import latents as lt
from avatarv_jax.data.avatarworld import ShardWriter, make_clip
from avatarv_jax.data.pipelines import default_data_config, make_pipeline
from avatarv_jax.tools.bench_io import host_info, write_json


def write_world(directory: str, people: int, clips_per_person: int, frames: int,
                resolution: int) -> None:
    writer = ShardWriter(directory, clips_per_shard=16)
    for k in range(people * clips_per_person):
        writer.add(make_clip(k, identity_id=k // clips_per_person, scene_id=7 * k + 3,
                             num_frames=frames, resolution=resolution,
                             speech_backend="synthetic"))
    writer.close()


def examples_per_second(cfg, batches: int, warmup: int = 5) -> dict:
    it = iter(make_pipeline(cfg, "sft", seed=0))
    for _ in range(warmup):                     # worker start-up and first reads
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    dt = time.perf_counter() - t
    return {"worker_count": int(cfg.worker_count), "batches": batches,
            "batch_size": int(cfg.batch_size), "seconds": round(dt, 3),
            "examples_per_second": round(batches * cfg.batch_size / dt, 1)}


def synthetic_clips(n: int, per_person: int = 5, dim: int = 128, seed: int = 0):
    rng = np.random.default_rng(seed)
    people = n // per_person
    face = np.repeat(rng.normal(size=(people, dim)), per_person, 0)
    face += 0.25 * rng.normal(size=face.shape)
    scenes = rng.integers(0, n, size=n)              # mostly distinct scenes, a few shared
    background = rng.normal(size=(n, 112))[scenes]
    return face, background, np.full(n, 49), np.repeat(np.arange(people), per_person), scenes


def graph_build(n: int, index: str) -> dict:
    face, background, frames, person, scene = synthetic_clips(n)
    t = time.perf_counter()
    g = ig.build_identity_graph(face, background, frames, face_threshold=0.8,
                                background_threshold=0.9, min_frames=17, k=16, index=index)
    dt = time.perf_counter() - t
    m = ig.evaluate_against_truth(g, person, scene, frames, 17)
    return {"clips": n, "index": g.params["index"], "seconds": round(dt, 3),
            "edges": len(g.edges), "precision": round(m["precision"], 4),
            "edge_recall": round(m["edge_recall"], 4)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--people", type=int, default=8)
    p.add_argument("--clips_per_person", type=int, default=4)
    p.add_argument("--clip_frames", type=int, default=33)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--graph_clips", default="10000,40000",
                   help="comma-separated clip counts for the graph build")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                 "data_pipeline.json"))
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.graph_clips, args.people = 4, "1000", 4
    result = {"device": host_info(faiss=ig.faiss_available()), "settings": vars(args).copy()}
    with tempfile.TemporaryDirectory() as tmp:
        world, latents = os.path.join(tmp, "aw"), os.path.join(tmp, "lat")
        write_world(world, args.people, args.clips_per_person, args.clip_frames, args.resolution)
        from avatarv_jax.config import get_model_config
        vae = lt.load_vae(get_model_config("tiny"), checkpoint=None, vae_weights=None,
                          random_init_seed=0)
        lt.encode_shards(vae, world, latents, frames=17, stride=8, batch=4, log=lambda *_: None)
        cfg = default_data_config()
        cfg.update(dict(shards=world, batch_size=args.batch, frames=17, ref_frames=5,
                        text_length=64, worker_buffer_size=2))
        make_pipeline(cfg, "sft", seed=0)       # builds and caches the identity graph
        runs = []
        for mode in ("pixels", "latents"):
            for workers in sorted({0, args.workers}):
                c = cfg.copy_and_resolve_references()
                c.worker_count = workers
                if mode == "latents":
                    c.latent_shards = latents
                run = {"mode": mode, "resolution": args.resolution, **examples_per_second(
                    c, args.batches)}
                print(json.dumps(run), flush=True)
                runs.append(run)
        result["sft_pipeline"] = runs
    result["graph_build"] = []
    for n in (int(v) for v in args.graph_clips.split(",")):
        for index in ["hnsw", "ivf", "exact"]:
            if index == "hnsw" and not ig.faiss_available():
                continue
            run = graph_build(n, index)
            print(json.dumps(run), flush=True)
            result["graph_build"].append(run)
    write_json(result, args.out)
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
