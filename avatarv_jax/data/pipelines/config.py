"""The data configuration of the input pipelines (``cfg.data`` in a training config)."""

from __future__ import annotations

import ml_collections

STAGES = ("t2v", "a2v", "sft")


def default_data_config() -> ml_collections.ConfigDict:
    """Defaults for every field ``make_pipeline`` reads; override per stage in the config.

    shards            directory of pixel shards (``manifest.json`` + ArrayRecord files):
                      AvatarWorld or real-video ingestion
    latent_shards     directory written by ``python -m avatarv_jax.data.latents``; when set,
                      batches hold ``latents`` / ``ref_latents`` instead of pixels
    batch_size        global batch; each of ``process_count`` hosts yields batch_size / count
    frames            target video frames T (1 + 4k); a random window of each clip
    ref_frames        SFT reference frames Tr (1 + 4r), a window of another clip of the person
    audio_context_frames  frames of audio either side of the clip in ``audio`` (zeros past the
                      clip's ends): ``audio`` holds (T + 2 x this) x 640 samples, and the
                      step keeps the encoder's features of the T frames themselves. Set it to
                      ``inference.audio_context_frames`` (the stage configs do) so the frozen
                      audio encoder sees the window inference gives it
    resolution        output side in pixels (0: the shards' resolution); pixel mode only
    crop_scale        (min, max) side of the random square crop, as a fraction of the frame's
                      shorter side, before resizing to ``resolution``; (1, 1) = no crop
    text_length       L of ``text_ids`` / ``text_mask``
    tokenizer         SentencePiece ``.model`` path, or "" for the byte tokenizer
    shuffle           shuffle records (per epoch, from the seed)
    num_epochs        0: repeat forever
    worker_count      Grain worker processes (0: in the calling process)
    worker_buffer_size  batches each worker prepares ahead
    graph.*           the identity graph of SFT (see identity_graph.py): thresholds,
                      ``min_frames`` (0: max(frames, ref_frames)), ``k`` neighbours, ``index``,
                      ``path`` (default: <shards>/identity_graph.npz), ``embed_frames`` (frames
                      per clip the AvatarWorld probe reads)
    """
    cfg = ml_collections.ConfigDict()
    cfg.shards = ""
    cfg.latent_shards = ""
    cfg.batch_size = 8
    cfg.frames = 17
    cfg.ref_frames = 5
    cfg.audio_context_frames = 0
    cfg.resolution = 0
    cfg.crop_scale = (1.0, 1.0)
    cfg.text_length = 64
    cfg.tokenizer = ""
    cfg.shuffle = True
    cfg.num_epochs = 0
    cfg.worker_count = 0
    cfg.worker_buffer_size = 2
    cfg.graph = ml_collections.ConfigDict(dict(
        face_threshold=0.82, background_threshold=0.985, min_frames=0, k=32, index="auto",
        path="", embed_frames=9))
    return cfg


def with_defaults(data_cfg: ml_collections.ConfigDict | dict | None) -> ml_collections.ConfigDict:
    """``data_cfg`` on top of the defaults; unknown fields are an error (typos fail loudly)."""
    cfg = default_data_config()
    given = data_cfg.to_dict() if isinstance(data_cfg, ml_collections.ConfigDict) else \
        dict(data_cfg or {})
    unknown = sorted(set(given) - set(cfg))
    if unknown:
        raise ValueError(f"unknown data config field(s) {unknown}; known: {sorted(cfg)}")
    graph = dict(given.pop("graph", {}) or {})
    unknown = sorted(set(graph) - set(cfg.graph))
    if unknown:
        raise ValueError(f"unknown data.graph field(s) {unknown}; known: {sorted(cfg.graph)}")
    cfg.update(given)
    cfg.graph.update(graph)
    return cfg


def check(cfg: ml_collections.ConfigDict, stage: str, process_count: int) -> None:
    """Clear errors for impossible settings, before any file is opened."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; choose from {STAGES}")
    if not cfg.shards and not cfg.latent_shards:
        raise ValueError("data config sets neither `shards` nor `latent_shards`")
    for name in ("frames",) + (("ref_frames",) if stage == "sft" else ()):
        t = int(cfg[name])
        if t < 1 or (t - 1) % 4:
            raise ValueError(f"data.{name} must be 1 + 4k (the causal VAE's frame counts), got {t}")
    if cfg.batch_size < 1 or cfg.batch_size % process_count:
        raise ValueError(f"data.batch_size {cfg.batch_size} must be a positive multiple of the "
                         f"process count {process_count}")
    lo, hi = (float(v) for v in cfg.crop_scale)
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"data.crop_scale must satisfy 0 < min <= max <= 1, got {(lo, hi)}")
    if cfg.resolution < 0 or cfg.resolution % 8:
        raise ValueError(f"data.resolution must be 0 or a multiple of 8, got {cfg.resolution}")
    if cfg.text_length < 1:
        raise ValueError(f"data.text_length must be >= 1, got {cfg.text_length}")
    if cfg.worker_count < 0 or cfg.num_epochs < 0:
        raise ValueError("data.worker_count and data.num_epochs must be >= 0")
    if cfg.audio_context_frames < 0:
        raise ValueError(f"data.audio_context_frames must be >= 0, got "
                         f"{cfg.audio_context_frames}")
