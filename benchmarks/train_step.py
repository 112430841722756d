"""Train-step time, TFLOP/s and MFU of the jitted, donated step (DESIGN §10).

    python benchmarks/train_step.py                       # CPU: tiny sft step, pixels in
    python benchmarks/train_step.py --model avatar_v_1_3b --gpu-figure
        # the issue's GPU figure: 1.3B, 480p (480x832), 81 frames, REF of 8 latent frames, bf16,
        # attention by cuDNN (the SRA rule as dense calls; the dense-mask reference needs
        # ~100 GB of logits), remat keeping only the attention kernels' outputs (the preset's
        # "dots" policy needs ~107 GB on one device)
    python benchmarks/train_step.py --model avatar_v_1_3b --gpu-figure --profile
        # also where the device time goes: per kernel and per kind, into the JSON

Writes ``benchmarks/results/train_step_<device>.json``. Times are the median of ``--steps``
steps after one warm-up (compile) step. FLOPs come from the explicit formula in
``training/metrics.py`` (forward + backward = 3x forward, recomputation not counted); MFU
divides by the device's dense bf16 peak. The GPU figure feeds precomputed latents, text and
audio features (the frozen encoders are not what is being trained or measured).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np
from flax import nnx

from avatarv_jax.layers import linear
from avatarv_jax.models import factory
from avatarv_jax.models.dit import DiT
from avatarv_jax.parallel.mesh import make_mesh
from avatarv_jax.training.metrics import dit_train_flops, peak_tflops
from avatarv_jax.training.optimizer import make_optimizer
from avatarv_jax.training.stage_config import stage_config
from avatarv_jax.training.state import create_train_state
from avatarv_jax.training.step import ModuleTemplate, TrainStepBuilder, module_params
from avatarv_jax.training.synthetic import synthetic_batch
from avatarv_jax.tools import device_profile
from avatarv_jax.tools.bench_io import device_name, device_tag, write_json


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--stage", default="sft", choices=("t2v", "a2v", "sft"))
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--frames", type=int, default=9, help="GEN video frames (1 + 4k)")
    parser.add_argument("--ref-frames", type=int, default=5, help="REF video frames (1 + 4k)")
    parser.add_argument("--height", type=int, default=32)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--text-len", type=int, default=16)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--gpu-figure", action="store_true",
                        help="480x832, 81 frames, REF 29 frames (8 latent), batch 1, features in")
    parser.add_argument("--features", action="store_true",
                        help="precomputed latents, text and audio features (no frozen encoders)")
    parser.add_argument("--attention-impl", default=None, choices=("xla", "pallas", "cudnn"),
                        help="attention of the DiT (default: the config's; cudnn with "
                             "--gpu-figure)")
    parser.add_argument("--remat", default=None, choices=("none", "dots", "full", "attention"),
                        help="remat policy of the DiT (default: the config's; attention with "
                             "--gpu-figure, where the 1.3B preset's dots needs ~107 GB)")
    parser.add_argument("--profile", action="store_true",
                        help="profile one more step: device time per kernel and per kind "
                             "(matmul, attention, other) into the JSON")
    parser.add_argument("--row-padding", default="auto", choices=("auto", "on", "off"),
                        help="Dense layers pad the token axis to 8-aligned GEMM rows "
                             "(auto: on GPUs)")
    parser.add_argument("--tag", default="", help="suffix of the result file name")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    features = args.gpu_figure or args.features
    if args.gpu_figure:
        args.batch, args.frames, args.ref_frames = 1, 81, 29
        args.height, args.width, args.text_len = 480, 832, 512

    linear.row_padding = args.row_padding
    cfg = stage_config(args.stage, args.model)
    cfg.optimizer.warmup_steps = 0
    impl = args.attention_impl or ("cudnn" if args.gpu_figure else None)
    if impl:
        cfg.model.attention_impl = impl
    remat = args.remat or ("attention" if args.gpu_figure else None)
    if remat:
        cfg.model.remat_policy = remat
    dit_cfg = factory.dit_config(cfg)
    stride = factory.vae_config(cfg).spatial_stride
    mesh = make_mesh(dict(cfg.mesh))

    abstract = nnx.eval_shape(lambda: factory.build_models(cfg))
    templates = {k: ModuleTemplate(m) for k, m in abstract.items()}
    frozen_names = () if features else ("text_encoder", "audio_encoder", "vae")
    tx, schedule = make_optimizer(cfg.optimizer, templates["dit"].logical_axes(), 1000)
    builder = TrainStepBuilder(dit=templates["dit"], frozen={k: templates[k] for k in frozen_names},
                               tx=tx, schedule=schedule, cfg=cfg, stage=args.stage, mesh=mesh)

    def init():
        if not frozen_names:   # features in: only the DiT exists in the step
            return module_params(DiT(dit_cfg, rngs=nnx.Rngs(0))), {}
        models = factory.build_models(cfg)
        return module_params(models["dit"]), {k: module_params(models[k]) for k in frozen_names}

    t0 = time.perf_counter()
    params, frozen = jax.jit(init, out_shardings=(builder.param_shardings(),
                                                  builder.frozen_shardings()))()
    abstract_state = builder.abstract_state()
    state = jax.jit(lambda p: create_train_state(p, tx, use_ema=abstract_state.ema is not None),
                    out_shardings=jax.tree.map(lambda x: x.sharding, abstract_state))(params)
    del params
    init_s = time.perf_counter() - t0

    latent = (args.height // stride, args.width // stride, dit_cfg.in_channels)
    batch = synthetic_batch(0, args.stage, batch_size=args.batch, num_frames=args.frames,
                            ref_frames=args.ref_frames, resolution=args.height,
                            text_len=args.text_len, motion_dim=dit_cfg.motion_dim or 10,
                            latent_shape=latent if features else None)
    if features:   # precomputed encoder outputs
        rng = np.random.default_rng(0)
        batch["text_embeddings"] = rng.standard_normal(
            (args.batch, args.text_len, dit_cfg.text_dim)).astype(np.float32)
        for key, t in (("audio", args.frames), ("ref_audio", args.ref_frames)):
            if key in batch:
                batch[key] = rng.standard_normal((args.batch, t, dit_cfg.audio_dim)
                                                 ).astype(np.float32)
        for key in ("mask_face", "mask_mouth", "mask_eyes"):
            batch.pop(key, None)
    device_batch = builder.put_batch(batch)
    step = builder.compile(state, device_batch)

    t0 = time.perf_counter()
    state, metrics = step(state, frozen, device_batch)
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = step(state, frozen, device_batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    profile = None
    if args.profile:
        def one_step():
            nonlocal state
            state, m = step(state, frozen, device_batch)
            jax.block_until_ready(m)
        profile = device_profile.profile_call(one_step)
        print(device_profile.format_summary(profile))

    f_gen = 1 + (args.frames - 1) // 4
    f_ref = 0 if args.stage == "t2v" else (1 if args.stage == "a2v" else 1 + (args.ref_frames - 1) // 4)
    _, ph, pw = dit_cfg.patch_size
    flops = dit_train_flops(dit_cfg, batch=args.batch, gen_frames=f_gen, ref_frames=f_ref,
                            grid=(latent[0] // ph, latent[1] // pw), text_len=args.text_len,
                            motion=args.stage == "sft", audio=args.stage != "t2v",
                            ref_audio=args.stage == "sft")
    peak = peak_tflops(jax.devices()[0].device_kind)
    memory = jax.devices()[0].memory_stats() or {}
    tflops = flops / step_s / jax.device_count() / 1e12
    result = {
        "device": device_name(), "num_devices": jax.device_count(), "model": args.model,
        "stage": args.stage, "dtype": dit_cfg.dtype, "remat": dit_cfg.remat_policy,
        "batch": args.batch, "frames": args.frames, "ref_frames": args.ref_frames,
        "latent_frames": {"gen": f_gen, "ref": f_ref}, "size": [args.height, args.width],
        "inputs": "precomputed latents/text/audio features" if features else
                  "pixels, token ids, waveforms (frozen encoders in the step)",
        "init_s": init_s, "compile_and_first_step_s": compile_s, "step_s": step_s,
        "step_s_all": times, "model_tflop_per_step": flops / 1e12,
        "tflops_per_device": tflops, "peak_tflops_per_device": peak,
        "mfu": tflops / peak if peak else None, "loss": float(metrics["loss"]),
        "attention_impl": dit_cfg.attention_impl, "row_padding": args.row_padding,
        "peak_memory_gib": (memory["peak_bytes_in_use"] / 2 ** 30
                            if "peak_bytes_in_use" in memory else None),
        "jax": jax.__version__,
    }
    if profile is not None:
        result["profile"] = profile
    print(json.dumps(result, indent=2))
    os.makedirs(args.out, exist_ok=True)
    tag = device_tag() + ("_" + args.model if args.model != "tiny" else "") + (
        "_features" if features and not args.gpu_figure else "") + (
        "_" + args.tag if args.tag else "")
    path = os.path.join(args.out, f"train_step_{tag}.json")
    write_json(result, path, indent=2)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
