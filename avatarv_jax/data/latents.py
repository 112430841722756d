"""Latent pre-encoding: run the VAE once over a shard set, so training reads latents, not pixels.

    python -m avatarv_jax.data.latents --config configs/tiny.py --shards DATA --dest LATENTS \\
        --checkpoint WORKDIR            # the VAE of a training run (or --vae_weights CONVERTED)

Every clip is cut into windows of ``--frames`` video frames (1 + 4k) starting every
``--stride`` frames; each window is encoded on its own, so its latents are exactly what the VAE
gives a training clip that starts there. A causal VAE's latent frame ``j`` depends only on
video frames up to its own, so the first ``1 + (T' - 1) / 4`` latent frames of a window are the
latents of its first ``T'`` frames: the pipelines take shorter targets, single-frame A2V
references and SFT reference windows as prefixes of these.

One record per window (npz bytes, no pickle): ``latents`` float32 [F, h, w, C] (normalised, the
posterior mean), the window's ``audio`` [T * 640], ``motion`` [T, M], ``mask_*`` [T, R, R],
``caption``, ``identity_id``, ``clip_index``, ``start``. ``manifest.json`` (written last)
lists the windows and the source clips with their identity-graph features (the manifest's own,
or the AvatarWorld probe's), so SFT in latent mode needs no pixels. Frames are centre-cropped to
a square and resized to ``--resolution`` (a multiple of the VAE's stride) first.

Output goes to a temporary sibling of ``--dest`` renamed at the end; bad input exits with 2.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import sys
import time
from typing import Any

import numpy as np

from avatarv_jax.data.pipelines.sources import (
    LATENT_FORMAT,
    MANIFEST,
    RecordReader,
    ShardSet,
)
from avatarv_jax.data.pipelines.transforms import (
    MASKS,
    SAMPLES_PER_FRAME,
    crop_resize_mask,
    crop_resize_video,
)

RECORD_VERSION = 1
WRITER_OPTIONS = "group_size:1,zstd:3"
_KEYS = ("frames", "audio", "motion", *MASKS, "caption", "identity_id")


class LatentsError(ValueError):
    """A problem with the request (paths, sizes, weights), reported without a traceback."""


def window_starts(num_frames: int, frames: int, stride: int) -> list[int]:
    """Starts of the ``frames``-long windows of a clip, every ``stride`` frames."""
    return list(range(0, num_frames - frames + 1, stride))


def square_box(height: int, width: int) -> tuple[int, int, int]:
    side = min(height, width)
    return (height - side) // 2, (width - side) // 2, side


def window_to_bytes(latents: np.ndarray, clip: dict[str, np.ndarray], clip_index: int,
                    start: int, frames: int, box, resolution: int) -> bytes:
    end = start + frames
    arrays = {
        "latents": np.asarray(latents, np.float32),
        "audio": np.asarray(clip["audio"], np.float32)[start * SAMPLES_PER_FRAME:
                                                       end * SAMPLES_PER_FRAME],
        "motion": np.asarray(clip["motion"], np.float32)[start:end],
        "caption": np.array(str(clip["caption"]), dtype=np.str_),
        "identity_id": np.int64(clip["identity_id"]), "clip_index": np.int64(clip_index),
        "start": np.int64(start), "format_version": np.int64(RECORD_VERSION)}
    for m in MASKS:
        arrays[m] = crop_resize_mask(np.asarray(clip[m][start:end], bool), box, resolution)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def make_encoder(vae):
    """A jitted ``uint8 [B, T, H, W, 3] -> latents`` (posterior mean, normalised)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, state = nnx.split(vae)

    @jax.jit
    def encode(state, frames):
        model = nnx.merge(graphdef, state)
        return model.encode(frames.astype(jnp.float32) / 127.5 - 1.0)

    return lambda frames: np.asarray(encode(state, frames))


def source_clip_entries(shards: ShardSet, embed_frames: int) -> list[dict[str, Any]]:
    """The source's clip entries, with identity-graph features added when they are missing."""
    from avatarv_jax.data import identity_graph as ig

    clips = [dict(c) for c in shards.clips()]
    if ig.manifest_features(clips) is None and shards.format == "avatarworld-arrayrecord":
        f = ig.avatarworld_features(shards.directory, frames_per_clip=embed_frames)
        for c, e, b in zip(clips, f["face_embedding"], f["background"]):
            c["face_embedding"] = [float(v) for v in e]
            c["background"] = [float(v) for v in b]
    return clips


def encode_shards(vae, source: str, dest: str, *, frames: int, stride: int | None = None,
                  resolution: int = 0, batch: int = 4, clips_per_shard: int = 256,
                  embed_frames: int = 9, extra: dict[str, Any] | None = None,
                  log=print) -> dict[str, Any]:
    """Encode every window of every clip of ``source`` into latent shards at ``dest``."""
    from array_record.python import array_record_module as ar

    shards = ShardSet(source)
    if shards.is_latent:
        raise LatentsError(f"{source} already holds latents")
    stride_px = vae.config.spatial_stride
    if frames < 1 or (frames - 1) % vae.config.temporal_stride:
        raise LatentsError(f"--frames must be 1 + {vae.config.temporal_stride}k, got {frames}")
    stride = stride or frames - 1 or 1
    if stride < 1:
        raise LatentsError(f"--stride must be >= 1, got {stride}")
    num_frames = shards.clip_frames()
    if (num_frames < frames).all():
        raise LatentsError(f"no clip of {source} has {frames} frames (longest: "
                           f"{int(num_frames.max())})")
    if os.path.exists(dest):
        raise LatentsError(f"{dest} exists; choose a new --dest")
    if not os.path.isdir(os.path.dirname(os.path.abspath(dest))):
        raise LatentsError(f"the parent directory of {dest} does not exist")
    clips_meta = source_clip_entries(shards, embed_frames)
    encode = make_encoder(vae)
    reader = RecordReader(shards.paths)
    batch = max(1, int(batch))
    tmp = f"{os.path.abspath(dest)}.partial-{os.getpid()}"
    os.makedirs(tmp)
    windows, shard_list, pending = [], [], []
    writer, latent_shape, out_res = None, None, None
    t0 = time.perf_counter()

    def flush():
        nonlocal writer, latent_shape
        if not pending:
            return
        videos = [p[0] for p in pending]
        videos += videos[-1:] * (batch - len(videos))    # one compiled shape for every call
        z = encode(np.stack(videos))[:len(pending)]
        latent_shape = list(z.shape[1:])
        for zi, (_, clip, ci, s, box) in zip(z, pending):
            if writer is None or shard_list[-1]["num_records"] >= clips_per_shard:
                if writer is not None:
                    writer.close()
                name = f"latents-{len(shard_list):05d}.array_record"
                writer = ar.ArrayRecordWriter(os.path.join(tmp, name), WRITER_OPTIONS)
                shard_list.append({"path": name, "num_records": 0})
            writer.write(window_to_bytes(zi, clip, ci, s, frames, box, out_res))
            shard_list[-1]["num_records"] += 1
            windows.append({"clip": ci, "start": s})
        pending.clear()

    try:
        for ci in range(len(num_frames)):
            starts = window_starts(int(num_frames[ci]), frames, stride)
            if not starts:
                continue
            clip = reader.read(ci, _KEYS)
            box = square_box(*clip["frames"].shape[1:3])
            res = resolution or box[2] // stride_px * stride_px
            if res % stride_px or res < stride_px:
                raise LatentsError(f"--resolution must be a positive multiple of {stride_px}, "
                                   f"got {res}")
            if out_res is not None and res != out_res:
                raise LatentsError("source clips differ in size; pass --resolution")
            out_res = res
            for s in starts:
                pending.append((crop_resize_video(clip["frames"][s:s + frames], box, res),
                                clip, ci, s, box))
                if len(pending) == batch:
                    flush()
            if (ci + 1) % 50 == 0:
                log(f"{ci + 1}/{len(num_frames)} clips, {len(windows) + len(pending)} windows")
        flush()
        if writer is not None:
            writer.close()
        manifest = {
            "format": LATENT_FORMAT, "record_version": RECORD_VERSION,
            "record_encoding": "npz (numpy zip, no pickle)", "writer_options": WRITER_OPTIONS,
            "window_frames": frames, "stride": stride, "resolution": out_res,
            "latent_shape": latent_shape, "num_records": len(windows), "shards": shard_list,
            "windows": windows, "source": os.path.abspath(source), "source_format": shards.format,
            "source_clips": clips_meta, "encode_seconds": round(time.perf_counter() - t0, 2),
            **(extra or {})}
        with open(os.path.join(tmp, MANIFEST + ".tmp"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=1, ensure_ascii=False)
        os.replace(os.path.join(tmp, MANIFEST + ".tmp"), os.path.join(tmp, MANIFEST))
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def load_vae(config, *, checkpoint: str | None, vae_weights: str | None,
             random_init_seed: int | None):
    """The VAE of ``config`` with weights from exactly one of the three sources."""
    import jax
    from flax import nnx

    from avatarv_jax.models import factory
    from avatarv_jax.models.vae import CausalVideoVAE

    given = [x is not None for x in (checkpoint, vae_weights, random_init_seed)]
    if sum(given) != 1:
        raise LatentsError("give exactly one of --checkpoint, --vae_weights, --random_init_seed")
    vae_cfg = factory.vae_config(config)
    if vae_weights is not None:
        from avatarv_jax.io.convert import load_converted

        if not os.path.isdir(vae_weights):
            raise LatentsError(f"--vae_weights {vae_weights} is not a directory")
        return load_converted(vae_weights, lambda: CausalVideoVAE(vae_cfg, rngs=nnx.Rngs(0)))
    # Eager initialisation: compiling the initialiser under jit costs more than running it.
    vae = CausalVideoVAE(vae_cfg, rngs=nnx.Rngs(random_init_seed or 0))
    if checkpoint is not None:
        from avatarv_jax.training.checkpoints import restore_models

        before = jax.tree_util.tree_leaves(nnx.state(vae))[0].copy()
        restore_models(checkpoint, {"vae": vae})
        if np.array_equal(np.asarray(before), np.asarray(jax.tree_util.tree_leaves(
                nnx.state(vae))[0])):
            raise LatentsError(f"checkpoint {checkpoint} holds no VAE weights (frozen/vae)")
    return vae


def check_request(config, args) -> None:
    """Every check that needs no weights: sizes, paths, the source."""
    from avatarv_jax.models import factory

    vae_cfg = factory.vae_config(config)
    if args.batch < 1 or args.clips_per_shard < 1:
        raise LatentsError("--batch and --clips_per_shard must be >= 1")
    if args.frames < 1 or (args.frames - 1) % vae_cfg.temporal_stride:
        raise LatentsError(f"--frames must be 1 + {vae_cfg.temporal_stride}k, got {args.frames}")
    if args.resolution < 0 or args.resolution % vae_cfg.spatial_stride:
        raise LatentsError(f"--resolution must be a positive multiple of "
                           f"{vae_cfg.spatial_stride}, got {args.resolution}")
    if sum(x is not None for x in (args.checkpoint, args.vae_weights,
                                   args.random_init_seed)) != 1:
        raise LatentsError("give exactly one of --checkpoint, --vae_weights, --random_init_seed")
    if os.path.exists(args.dest):
        raise LatentsError(f"{args.dest} exists; choose a new --dest")
    ShardSet(args.shards)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m avatarv_jax.data.latents",
                                description="Encode a shard set's clips into latent shards.")
    p.add_argument("--config", required=True, help="config file (path.py or path.py:arg)")
    p.add_argument("--shards", required=True, help="source shard directory (with manifest.json)")
    p.add_argument("--dest", required=True, help="output directory (must not exist)")
    p.add_argument("--frames", type=int, default=17, help="video frames per window (1 + 4k)")
    p.add_argument("--stride", type=int, default=None,
                   help="frames between window starts (default: frames - 1)")
    p.add_argument("--resolution", type=int, default=0,
                   help="square side before encoding (default: the frames' shorter side)")
    p.add_argument("--batch", type=int, default=4, help="windows per VAE call")
    p.add_argument("--clips_per_shard", type=int, default=256, help="records per output shard")
    p.add_argument("--checkpoint", default=None, help="training workdir or step directory")
    p.add_argument("--vae_weights", default=None,
                   help="converted VAE (python -m avatarv_jax.io.convert --kind wan_vae)")
    p.add_argument("--random_init_seed", type=int, default=None,
                   help="a freshly initialised VAE (tests and demos only)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from avatarv_jax.io.convert import ConversionError, load_config_file

        try:
            config = load_config_file(args.config)
        except ConversionError as e:
            raise LatentsError(str(e)) from None
        check_request(config, args)             # bad input fails before weights load
        vae = load_vae(config, checkpoint=args.checkpoint, vae_weights=args.vae_weights,
                       random_init_seed=args.random_init_seed)
        source = {"vae": config.vae, "checkpoint": args.checkpoint,
                  "vae_weights": args.vae_weights, "random_init_seed": args.random_init_seed}
        m = encode_shards(vae, args.shards, args.dest, frames=args.frames, stride=args.stride,
                          resolution=args.resolution, batch=args.batch,
                          clips_per_shard=args.clips_per_shard, extra={"weights": source})
    except (LatentsError, FileNotFoundError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {m['num_records']} windows of {m['window_frames']} frames "
          f"(latents {m['latent_shape']}) to {args.dest} in {m['encode_seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
