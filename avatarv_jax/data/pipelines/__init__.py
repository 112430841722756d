"""Grain input pipelines per training stage over ArrayRecord shards (DESIGN §5, §10).

    from avatarv_jax.data.pipelines import default_data_config, make_pipeline
    cfg = default_data_config(); cfg.shards = "/data/avatarworld"; cfg.batch_size = 4
    loader = make_pipeline(cfg, "sft", seed=0, process_index=jax.process_index(),
                           process_count=jax.process_count())
    it = iter(loader); batch = next(it)        # dict of numpy arrays, leading dim B / hosts

Batches (B = batch_size / process_count, T = frames, Tr = ref_frames):

=========  =====================================================================================
every      ``video`` uint8 [B, T, H, W, 3] (latent mode: ``latents`` float32 [B, F, h, w, C],
           F = 1 + (T - 1) / 4), ``text_ids`` int32 [B, L], ``text_mask`` bool [B, L],
           ``identity_id`` int32 [B] (-1 when unknown)
``a2v``    + ``audio`` float32 [B, T * 640] under the video frames, ``ref_video`` uint8
           [B, 1, H, W, 3]: one frame of the same clip (``ref_latents`` [B, 1, h, w, C])
``sft``    + ``audio``, ``motion`` float32 [B, T, M], ``mask_face`` / ``mask_mouth`` /
           ``mask_eyes`` bool [B, T, H, W]; the reference is a window of a *different* clip
           of the same person (an edge of the identity graph): ``ref_video`` uint8
           [B, Tr, H, W, 3] (``ref_latents`` [B, 1 + (Tr - 1) / 4, h, w, C]), ``ref_audio``
           float32 [B, Tr * 640], ``ref_motion`` float32 [B, Tr, M]
=========  =====================================================================================

Each host reads a disjoint shard of the examples (Grain ``ShardOptions`` from the process
index and count). The iterator's state (``it.get_state()``) is what
``grain.checkpoint.CheckpointSave`` stores in an Orbax checkpoint; restoring it continues
with exactly the batches that would have come next. docs/data.md has the details.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os

import grain
import ml_collections
import numpy as np

from avatarv_jax.data import identity_graph as ig
from avatarv_jax.data.pipelines.config import (
    STAGES,
    check,
    default_data_config,
    with_defaults,
)
from avatarv_jax.data.pipelines.sources import (
    ClipWindows,
    ExampleIndex,
    RecordReader,
    ShardSet,
)
from avatarv_jax.data.pipelines.transforms import StageExample

__all__ = ["STAGES", "default_data_config", "example_items", "make_pipeline", "sft_graph"]

GRAPH_FILE = "identity_graph.npz"


def _mark_flags_parsed() -> None:
    """Grain workers read absl flags; outside ``app.run`` nothing has parsed them."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def sft_graph(cfg: ml_collections.ConfigDict, shards: ShardSet) -> ig.IdentityGraph:
    """The identity graph of the shard set's clips: loaded from a file, else built and cached.

    Features come from the manifest when ingestion (or latent pre-encoding) stored them, else
    from the AvatarWorld probe over the pixel shards. ``<shards>/identity_graph.npz`` is used
    when it was built with the same thresholds, ``min_frames`` and ``k``; otherwise the graph
    is built and cached as ``identity_graph-<hash of the parameters>.npz`` beside it (or at
    ``graph.path``), never overwriting a graph another tool wrote.
    """
    g = cfg.graph
    min_frames = int(g.min_frames) or max(int(cfg.frames), int(cfg.ref_frames))
    want = dict(face_threshold=float(g.face_threshold),
                background_threshold=float(g.background_threshold), min_frames=min_frames,
                k=int(g.k))
    num_clips = len(shards.clips())

    def fits(graph):
        return graph.num_nodes == num_clips and all(graph.params.get(k) == v
                                                    for k, v in want.items())

    # The data set's own graph (AvatarWorld cache or ingestion's) when its parameters match;
    # otherwise a cache named by the parameters, so another tool's graph is never overwritten.
    default = os.path.join(shards.directory, GRAPH_FILE)
    key = hashlib.sha256(json.dumps(want, sort_keys=True).encode()).hexdigest()[:10]
    candidates = [g.path] if g.path else [default, default.replace(".npz", f"-{key}.npz")]
    for candidate in candidates:
        if os.path.isfile(candidate) and fits(graph := ig.IdentityGraph.load(candidate)):
            return graph
    path = candidates[0] if g.path or not os.path.exists(default) else candidates[1]
    features = ig.manifest_features(shards.clips())
    if features is None:
        if shards.is_latent or shards.format != "avatarworld-arrayrecord":
            raise ValueError(f"{shards.directory}: the manifest stores no per-clip face_embedding "
                             "and background, and this is not an AvatarWorld set the probe "
                             "can embed; the SFT pairs cannot be built")
        features = ig.avatarworld_features(shards.directory, frames_per_clip=int(g.embed_frames))
    graph = ig.build_identity_graph(features["face_embedding"], features["background"],
                                    features["num_frames"], index=str(g.index), **want)
    try:
        graph.save(path)
    except OSError as e:  # a read-only data set: keep the graph in memory
        logging.getLogger(__name__).warning("could not cache the identity graph at %s: %s", path, e)
    return graph


def example_items(cfg: ml_collections.ConfigDict, stage: str,
                  shards: ShardSet) -> tuple[np.ndarray, ClipWindows | None]:
    """The id rows the sampler draws from, and the window index of a latent set.

    t2v / a2v: one row per usable clip (pixels) or latent window; sft: one row per directed
    edge (target clip, reference clip) of the identity graph.
    """
    windows = None
    frames = shards.clip_frames()
    if shards.is_latent:
        m = shards.manifest
        window_frames = int(m["window_frames"])
        if cfg.frames > window_frames or (stage == "sft" and cfg.ref_frames > window_frames):
            raise ValueError(f"{shards.directory} holds latents of {window_frames}-frame windows; "
                             f"data.frames ({cfg.frames}) and data.ref_frames ({cfg.ref_frames}) "
                             "must not exceed it (re-encode with a longer --frames)")
        if cfg.resolution and cfg.resolution != int(m["resolution"]):
            raise ValueError(f"{shards.directory} holds latents of {m['resolution']} px frames; "
                             f"data.resolution is {cfg.resolution} (set it to 0 or "
                             f"{m['resolution']}, or re-encode with --resolution)")
        window_clip = np.asarray([w["clip"] for w in m["windows"]], np.int64)
        windows = ClipWindows(window_clip, len(frames))
        if stage != "sft":
            return np.arange(len(window_clip), dtype=np.int64)[:, None], windows
    if stage != "sft":
        usable = np.flatnonzero(frames >= cfg.frames)
        if usable.size == 0:
            raise ValueError(f"no clip in {shards.directory} has the {cfg.frames} frames asked "
                             f"for (longest: {int(frames.max())})")
        return usable[:, None], windows
    pairs = sft_graph(cfg, shards).directed_pairs()
    if windows is not None:
        has = np.asarray([windows.count(int(c)) > 0 for c in range(len(frames))])
        pairs = pairs[has[pairs[:, 0]] & has[pairs[:, 1]]]
    if pairs.shape[0] == 0:
        raise ValueError(f"the identity graph of {shards.directory} has no edge: no two clips of "
                         "one person in different scenes (check data.graph thresholds and "
                         "min_frames)")
    return pairs, windows


def make_pipeline(data_cfg: ml_collections.ConfigDict, stage: str, *, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.DataLoader:
    """A Grain ``DataLoader`` of ``stage`` batches (see the module docstring)."""
    cfg = with_defaults(data_cfg)
    check(cfg, stage, process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside [0, {process_count})")
    shards = ShardSet(cfg.latent_shards or cfg.shards)
    items, windows = example_items(cfg, stage, shards)
    per_host = cfg.batch_size // process_count
    if items.shape[0] // process_count < per_host:
        raise ValueError(f"{items.shape[0]} {stage} examples cannot fill a batch of {per_host} "
                         f"on each of {process_count} host(s)")
    shard_options = grain.sharding.ShardOptions(shard_index=process_index,
                                                shard_count=process_count, drop_remainder=True)
    sampler = grain.samplers.IndexSampler(
        num_records=items.shape[0], shard_options=shard_options, shuffle=bool(cfg.shuffle),
        num_epochs=int(cfg.num_epochs) or None, seed=int(seed))
    example = StageExample(
        stage=stage, reader=RecordReader(shards.paths), frames=int(cfg.frames),
        ref_frames=int(cfg.ref_frames), resolution=int(cfg.resolution),
        crop_scale=tuple(float(v) for v in cfg.crop_scale), text_length=int(cfg.text_length),
        tokenizer_path=str(cfg.tokenizer), windows=windows,
        audio_context=int(cfg.audio_context_frames))
    if cfg.worker_count:
        _mark_flags_parsed()
    return grain.DataLoader(
        data_source=ExampleIndex(items), sampler=sampler,
        operations=[example, grain.transforms.Batch(per_host, drop_remainder=True)],
        worker_count=int(cfg.worker_count), worker_buffer_size=int(cfg.worker_buffer_size),
        shard_options=shard_options)
