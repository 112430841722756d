"""The training loop of every stage (DESIGN §5, §10); stages 4-5 bring their own step
(``posttrain.stages``) and a frozen ``teacher`` DiT.

``train(cfg, workdir)``:
  1. mesh from ``cfg.mesh``; models built abstractly, parameters initialised directly into
     their shardings;
  2. a checkpoint in the workdir -> resume it (state, frozen models, data iterator), else
     ``cfg.init_from`` -> parameter surgery from the previous stage (in stages 4-5 that DiT,
     unchanged, also becomes the frozen teacher), else fresh weights; ``cfg.init_vae`` loads
     a pre-trained VAE;
  3. the jitted, donated step over the data; the NaN guard, metrics, periodic async
     checkpoints and sample videos; SIGTERM -> save now and return cleanly.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from avatarv_jax.models import factory
from avatarv_jax.parallel.mesh import make_mesh
from avatarv_jax.training import checkpoints as ckpt_lib
from avatarv_jax.training.batch import check_batch
from avatarv_jax.training.guard import check_bad_steps
from avatarv_jax.training.metrics import (MetricsWriter, dit_train_flops, peak_tflops,
                                          throughput)
from avatarv_jax.training.optimizer import make_optimizer, optimizer_groups
from avatarv_jax.training.state import create_train_state
from avatarv_jax.training.step import ModuleTemplate, TrainStepBuilder, module_params
from avatarv_jax.training.stage_config import POSTTRAIN_STAGES, SR_STAGES, data_stage
from avatarv_jax.training.surgery import transplant

FROZEN = ckpt_lib.FROZEN_MODELS


class StopRequest:
    """SIGTERM (preemption, ``kill``) sets a flag; the loop saves and returns at the next step.
    With several processes they agree, so every host saves the same step."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)

    def agreed(self) -> bool:
        if jax.process_count() == 1:
            return self.requested
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))


def write_config(cfg, workdir: Path) -> None:
    """``WORKDIR/config.json``: the full config, written to a temporary name then renamed."""
    if jax.process_index() != 0:
        return
    workdir.mkdir(parents=True, exist_ok=True)
    tmp = workdir / f".config.json.tmp{os.getpid()}"
    tmp.write_text(cfg.to_json_best_effort(indent=2))
    os.replace(tmp, workdir / "config.json")


def check_same_encoders(cfg, init_from: str) -> None:
    """The previous stage's encoder and VAE presets (its ``config.json``) must be this run's.

    The frozen encoders come along from that checkpoint, so a different preset cannot load;
    saying which flag to pass beats a list of mismatched tensor shapes.
    """
    step_dir = ckpt_lib.resolve_step_dir(init_from)
    found = [p / "config.json" for p in (Path(init_from).absolute(), *step_dir.parents[:2])]
    found = [p for p in found if p.is_file()]
    if not found:
        return                        # a bare step directory: the shape check still guards
    previous = json.loads(found[0].read_text())
    differ = [k for k in ("text_encoder", "audio_encoder", "vae")
              if k in previous and previous[k] != cfg.get(k)]
    if differ:
        raise ValueError(
            f"init_from {init_from} was trained with "
            + ", ".join(f"{k}={previous[k]!r} (this run: {cfg.get(k)!r})" for k in differ)
            + "; pass " + " ".join(f"--config.{k}={previous[k]}" for k in differ))


def make_data(cfg) -> Iterable:
    """The stage's Grain pipeline (imported here: the trainer itself needs no data module),
    or synthetic batches of the same contract with ``train.synthetic_data``."""
    if cfg.train.synthetic_data:
        from avatarv_jax.training.synthetic import synthetic_dataset
        d = cfg.data
        latent = None
        if cfg.train.synthetic_latents:
            stride, z = factory.vae_config(cfg).spatial_stride, factory.vae_config(cfg).z_dim
            latent = (d.resolution // stride, d.resolution // stride, z)
        per_process = int(d.batch_size) // jax.process_count()
        return synthetic_dataset(
            data_stage(cfg.stage), num_batches=int(cfg.train.num_steps), batch_size=per_process,
            num_frames=int(d.frames), ref_frames=int(d.ref_frames),
            resolution=int(d.resolution), text_len=int(d.text_length),
            motion_dim=int(cfg.model.motion_dim) or 10,
            seed=int(cfg.train.seed) * 1000 + jax.process_index(), latent_shape=latent)
    if cfg.stage == "dpo" and str(cfg.dpo.pairs) != "auto":    # human preference pairs
        from avatarv_jax.posttrain.preference_data import make_preference_pipeline
        return make_preference_pipeline(cfg, process_index=jax.process_index(),
                                        process_count=jax.process_count())
    from avatarv_jax.data.pipelines import make_pipeline
    return make_pipeline(cfg.data, data_stage(cfg.stage), seed=int(cfg.train.seed),
                         process_index=jax.process_index(), process_count=jax.process_count())


def load_previous_stage(path: str, mesh, abstract_frozen: Mapping[str, Any], *,
                        use_ema: bool) -> tuple[dict, dict, Path]:
    """The previous stage's DiT parameters (pure dict, replicated: surgery reshapes the tree)
    and those of its frozen models that this stage also has (restored into their shardings,
    after a name and shape check)."""
    step_dir = ckpt_lib.resolve_step_dir(path)
    item = "ema" if use_ema and (step_dir / "ema").is_dir() else "params"
    rep = NamedSharding(mesh, P())
    meta = ocp.StandardCheckpointer().metadata(step_dir / item).item_metadata.tree
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=rep), meta,
                          is_leaf=lambda x: hasattr(x, "shape") and not isinstance(x, Mapping))
    dit = ocp.StandardCheckpointer().restore(step_dir / item, target)
    frozen = {}
    if (step_dir / "frozen").is_dir():
        saved = ckpt_lib.read_item_shapes(step_dir, "frozen")
        names = sorted({k.split("/")[0] for k in saved} & set(abstract_frozen))
        for name in names:
            ckpt_lib.check_fits({k[len(name) + 1:]: v for k, v in saved.items()
                                 if k.startswith(name + "/")},
                                ckpt_lib._shapes(abstract_frozen[name]),
                                f"frozen {name} of {step_dir}")
        target = {k: abstract_frozen[k] for k in names}
        frozen = ocp.PyTreeCheckpointer().restore(
            step_dir / "frozen", args=ocp.args.PyTreeRestore(
                item=target, restore_args=jax.tree.map(
                    lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding), target),
                partial_restore=True))
    return dit, frozen, step_dir


def train(cfg, workdir: str | os.PathLike, *, data: Iterable | None = None,
          log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the stage ``cfg.stage`` in ``workdir``; returns a short summary."""
    workdir = Path(workdir).absolute()
    stage = cfg.stage
    is_main = jax.process_index() == 0
    writer = None
    say = log or (lambda s: writer.log_line(s) if writer else print(s, flush=True))
    write_config(cfg, workdir)

    # Stages with a frozen previous-stage DiT (``teacher``), started from that stage.
    posttrain = stage in POSTTRAIN_STAGES or stage == "distill_sr"
    if cfg.init_from:
        check_same_encoders(cfg, cfg.init_from)    # also: a bad path fails before any work
    init_vae = str(cfg.get("init_vae", "") or "")
    if init_vae and not os.path.isfile(init_vae):
        raise FileNotFoundError(f"init_vae: no VAE weights file at {init_vae} (write one with "
                                "python -m avatarv_jax.training.vae_pretrain)")
    mesh = make_mesh(dict(cfg.mesh))
    seed = int(cfg.train.seed)
    factory.check_compatible(cfg)
    abstract = nnx.eval_shape(lambda: factory.build_models(cfg, seed=seed))
    templates = {name: ModuleTemplate(m) for name, m in abstract.items()}
    dit_t = templates["dit"]
    frozen_t = {k: templates[k] for k in FROZEN}
    builder_cls = TrainStepBuilder
    if stage in SR_STAGES:      # the SR refiner (posttrain/sr_stages.py)
        from avatarv_jax.posttrain import sr_stages
        builder_cls = sr_stages.BUILDERS[stage]
        if posttrain:
            frozen_t["teacher"] = sr_stages.teacher_template(cfg)
    elif posttrain:
        from avatarv_jax.posttrain.stages import BUILDERS, teacher_template
        frozen_t["teacher"] = teacher_template(cfg)
        builder_cls = BUILDERS[stage]
    num_steps = int(cfg.train.num_steps)
    tx, schedule = make_optimizer(cfg.optimizer, dit_t.logical_axes(), num_steps)
    builder = builder_cls(dit=dit_t, frozen=frozen_t, tx=tx, schedule=schedule, cfg=cfg,
                          stage=stage, mesh=mesh)
    abstract_state = builder.abstract_state()
    state_sh = jax.tree.map(lambda x: x.sharding, abstract_state)
    frozen_sh = builder.frozen_shardings()
    abstract_frozen = {k: jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                          sharding=s),
                                       nnx.to_pure_dict(t.abstract), frozen_sh[k])
                       for k, t in frozen_t.items()}

    checkpointer = ckpt_lib.TrainCheckpointer(
        workdir, every_steps=int(cfg.checkpoint.every_steps), keep=int(cfg.checkpoint.keep),
        async_save=bool(cfg.checkpoint.async_save))
    dataset = make_data(cfg) if data is None else data
    iterator = iter(dataset)

    writer_kwargs = dict(total_steps=num_steps, progress_bar=bool(cfg.train.progress_bar),
                         enabled=is_main)
    if posttrain and checkpointer.latest_step() is None and not cfg.init_from:
        raise ValueError(f"stage {stage} starts from a previous stage's checkpoint (its frozen "
                         "teacher/reference and the student's initial weights): set "
                         "--config.init_from")
    if checkpointer.latest_step() is not None:
        state, frozen, meta = checkpointer.restore(abstract_state, abstract_frozen, iterator)
        start = int(meta["step"])
        writer = MetricsWriter(workdir, start_step=start, **writer_kwargs)
        say(f"resumed {stage} from {checkpointer.directory}/{start}")
    else:
        start = 0
        writer = MetricsWriter(workdir, **writer_kwargs)

        def init():
            models = factory.build_models(cfg, seed=seed)
            return {k: module_params(m) for k, m in models.items()}

        shardings = dict({k: frozen_sh[k] for k in FROZEN}, dit=builder.param_shardings())
        params = jax.jit(init, out_shardings=shardings)()
        if cfg.init_from:
            encoders = {k: abstract_frozen[k] for k in FROZEN}
            prev_dit, prev_frozen, step_dir = load_previous_stage(
                cfg.init_from, mesh, encoders, use_ema=bool(cfg.init_from_ema))
            carried, report = transplant(prev_dit, params["dit"])
            params["dit"] = jax.device_put(carried, shardings["dit"])
            params.update(prev_frozen)
            if posttrain:   # the previous stage's DiT, as it was, is the frozen teacher
                ckpt_lib.check_fits(ckpt_lib._shapes(prev_dit),
                                    ckpt_lib._shapes(abstract_frozen["teacher"]),
                                    f"the teacher of {stage} ({step_dir})")
                params["teacher"] = jax.device_put(prev_dit, frozen_sh["teacher"])
            say(f"initialised from {step_dir}: frozen models {sorted(prev_frozen)}"
                + (" + teacher" if posttrain else ""))
            for line in report.lines():
                say(line)
        if init_vae:    # a pre-trained VAE replaces the random or inherited one
            from avatarv_jax.training.vae_pretrain import load_pretrained_vae
            vae = load_pretrained_vae(init_vae, templates["vae"].merge(params["vae"]))
            params["vae"] = jax.device_put(module_params(vae), frozen_sh["vae"])
            say(f"frozen VAE loaded from {init_vae}")
        state = jax.jit(lambda p: create_train_state(p, tx, use_ema=abstract_state.ema is not None),
                        out_shardings=state_sh.replace(aux=None))(params["dit"])
        if abstract_state.aux is not None:
            aux = jax.jit(builder.initial_aux, out_shardings=state_sh.aux)(state.params)
            state = state.replace(aux=aux)
        frozen = {k: params[k] for k in frozen_t}
        groups = optimizer_groups(dit_t.logical_axes())
        say(f"{stage}: {len(groups['muon'])} Muon matrices, {len(groups['adamw'])} AdamW "
            f"parameters; mesh {dict(mesh.shape)}")

    device_kind = jax.devices()[0].device_kind
    peak = float(cfg.train.peak_tflops_per_device) or peak_tflops(device_kind)
    step_fn, step_flops = None, None
    step = start
    last_time, last_step = time.perf_counter(), step
    stopped = "done"
    sample_every = int(cfg.train.sample_every)
    try:
        with StopRequest() as stop:
            while step < num_steps:
                try:
                    host_batch = next(iterator)
                except StopIteration:
                    raise RuntimeError(f"the data ran out at step {step} of {num_steps}") from None
                if step_fn is None:
                    check_batch(host_batch, data_stage(stage))
                batch = builder.put_batch(host_batch)
                if step_fn is None:
                    step_fn = builder.compile(state, batch)
                    step_flops = _batch_flops(cfg, batch, stage)
                first = step == start
                state, metrics = step_fn(state, frozen, batch)
                step += 1
                if first:   # leave compilation out of the throughput figures
                    jax.block_until_ready(state.step)
                    last_time, last_step = time.perf_counter(), step
                bad = int(jax.device_get(state.bad_steps))
                writer.advance()
                if bad or step % int(cfg.train.log_every) == 0 or step == num_steps:
                    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    if step > last_step:
                        now = time.perf_counter()
                        examples = (step - last_step) * int(batch["text_ids"].shape[0])
                        values.update(throughput(step_flops * (step - last_step), now - last_time,
                                                 examples, jax.device_count(), peak))
                        last_time, last_step = now, step
                    writer.write(step, values)
                    if check_bad_steps(bad, step=step, limit=int(cfg.train.max_bad_steps),
                                       metrics=values):
                        say(f"step {step}: non-finite loss or gradient, update skipped "
                            f"({bad} in a row)")
                checkpointer.save(state, frozen, iterator, stage=stage)
                if sample_every and step % sample_every == 0 and is_main:
                    from avatarv_jax.training.samples import write_sample
                    write_sample(cfg, builder, state, frozen, host_batch, workdir / "samples",
                                 step=step)
                if stop.agreed():
                    stopped = "sigterm"
                    break
        checkpointer.save(state, frozen, iterator, stage=stage, force=True)
    finally:   # a NaN stop or an error still finishes pending saves and closes the logs
        checkpointer.close()
        writer.close()
    say(f"{stage}: stopped at step {step} ({stopped}); checkpoint in {checkpointer.directory}")
    return {"step": step, "stopped": stopped, "state": state}


def _batch_flops(cfg, batch: Mapping, stage: str) -> float:
    factor = 1.0
    if stage in POSTTRAIN_STAGES:
        from avatarv_jax.posttrain.stages import train_flops_factor
        factor = train_flops_factor(cfg)
    elif stage in SR_STAGES:
        from avatarv_jax.posttrain.sr_stages import train_flops_factor as sr_flops_factor
        factor = sr_flops_factor(cfg)
    return factor * _stage_flops(cfg, batch, data_stage(stage))


def _stage_flops(cfg, batch: Mapping, stage: str) -> float:
    dit_cfg = factory.dit_config(cfg)
    stride = factory.vae_config(cfg).spatial_stride
    if "latents" in batch:
        b, f, h, w = batch["latents"].shape[:4]
    else:
        b, t, h, w = batch["video"].shape[:4]
        f, h, w = 1 + (t - 1) // 4, h // stride, w // stride
    ref_frames = 0
    if stage != "t2v":
        if "ref_latents" in batch:
            ref_frames = batch["ref_latents"].shape[1]
        else:
            ref_frames = 1 + (batch["ref_video"].shape[1] - 1) // 4
    _, ph, pw = dit_cfg.patch_size
    return dit_train_flops(dit_cfg, batch=b, gen_frames=f, ref_frames=ref_frames,
                           grid=(h // ph, w // pw), text_len=batch["text_ids"].shape[1],
                           motion=stage == "sft", audio=stage != "t2v",
                           ref_audio=stage == "sft")
