"""Stages 4-5 through train(): the chain from the tiny SFT checkpoint in tests/data, each
stage's start (teacher = the previous stage exactly, student by surgery), and exact resume
after SIGTERM."""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from avatarv_jax.training.checkpoints import resolve_step_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# An SFT checkpoint of the tiny preset (stride-8 VAE), kept for the tests: tests/data/README.md.
SFT_TINY = os.path.join(ROOT, "tests", "data", "sft_tiny")
NUM_STEPS = 3
CHAIN = (("distill_cfg", None), ("distill_dmd", "distill_cfg"), ("grpo", "distill_dmd"),
         ("dpo", "distill_dmd"))

# The child, in "run" mode, runs every stage straight to NUM_STEPS (workdir <stage>_a,
# initialised from the previous stage's _a run), then again in <stage>_b from the same start
# with a data stream that sends SIGTERM while step 2 runs; in "resume" mode, a new process,
# it resumes every _b. Both share a persistent compilation cache: compiling a stage's step
# dominates the test's time.
CHILD = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from avatarv_jax.training.trainer import train
    from tests.test_posttrain_resume import CHAIN, data, start_of, stage_config_for

    out, mode = sys.argv[1:3]
    for stage, _ in CHAIN:
        cfg = lambda: stage_config_for(stage, start_of(stage, out))
        if mode == "resume":
            r = train(cfg(), f"{{out}}/{{stage}}_b", data=data())
            print("RESUMED", stage, r["step"], r["stopped"], flush=True)
            continue
        a = train(cfg(), f"{{out}}/{{stage}}_a", data=data())
        b = train(cfg(), f"{{out}}/{{stage}}_b", data=data(kill_at=1))
        print("RESULT", stage, a["step"], a["stopped"], b["step"], b["stopped"], flush=True)
""")


def start_of(stage, out):
    previous = dict(CHAIN)[stage]
    return SFT_TINY if previous is None else f"{out}/{previous}_a"


def data(kill_at=None):
    """Synthetic SFT latents; batch ``kill_at`` sends SIGTERM to this process when drawn."""
    from avatarv_jax.testing import sigterm_at
    from avatarv_jax.training.synthetic import synthetic_dataset

    return sigterm_at(synthetic_dataset("sft", num_batches=NUM_STEPS, batch_size=2,
                                        num_frames=9, ref_frames=5, resolution=32, text_len=8,
                                        latent_shape=(4, 4, 16)), kill_at)


def stage_config_for(stage, init_from):
    from avatarv_jax.testing import quick_stage_config
    cfg = quick_stage_config(stage, NUM_STEPS, init_from)
    if stage == "grpo":
        cfg.grpo.group_size = 2
        cfg.grpo.sampling_steps = 2
        cfg.grpo.train_steps = 1
    if stage == "dpo":
        cfg.dpo.group_size = 2
        cfg.dpo.sampling_steps = 2
    if stage == "distill_dmd":
        cfg.dmd.fake_updates = 2
    return cfg


def _items(workdir):
    step_dir = resolve_step_dir(workdir)
    out = {}
    for item in ("params", "ema", "opt_state", "aux", "frozen"):
        if (step_dir / item).is_dir():
            out[item] = ocp.StandardCheckpointer().restore(step_dir / item)
    return int(step_dir.name), out


def _run(mode, out):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=str(out / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    proc = subprocess.run([sys.executable, "-c", CHILD.format(root=ROOT), str(out), mode], env=env,
                          capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return [line.split() for line in proc.stdout.splitlines()
            if line.startswith(("RESULT", "RESUMED"))]


def test_stages_4_5_chain_and_resume_exactly_after_sigterm(tmp_path):
    """For each stage: SIGTERM + resume equals the straight run bit for bit (params,
    optimizer, EMA, DMD's fake score, frozen models); frozen/teacher is the previous stage's
    DiT bit for bit (its EMA when saved); the trained DiT moved away from it; the student
    gains exactly the guidance embedding in distill_cfg; every logged loss is finite."""
    from avatarv_jax.training.surgery import _flat

    results = {r[1]: r[2:] for r in _run("run", tmp_path)}
    resumed = {r[1]: r[2:] for r in _run("resume", tmp_path)}
    for stage, previous in CHAIN:
        a_step, a_stop, b_step, b_stop = results[stage]
        assert (int(a_step), a_stop) == (NUM_STEPS, "done"), stage
        assert b_stop == "sigterm" and 1 <= int(b_step) < NUM_STEPS, (stage, b_step, b_stop)
        assert resumed[stage] == [str(NUM_STEPS), "done"], stage

        step_a, items_a = _items(tmp_path / f"{stage}_a")
        step_b, items_b = _items(tmp_path / f"{stage}_b")
        assert step_a == step_b == NUM_STEPS
        assert set(items_a) == set(items_b)
        assert ("aux" in items_a) == (stage == "distill_dmd"), stage
        for item in items_a:
            la, lb = jax.tree.leaves(items_a[item]), jax.tree.leaves(items_b[item])
            assert len(la) == len(lb) > 0
            for x, y in zip(la, lb):
                np.testing.assert_array_equal(np.asarray(x), np.asarray(y),
                                              err_msg=f"{stage} {item}")
        for line in (tmp_path / f"{stage}_a" / "metrics.jsonl").read_text().splitlines():
            assert np.isfinite(json.loads(line)["loss"]), (stage, line)

        prev_dir = resolve_step_dir(start_of(stage, tmp_path))
        item = "ema" if (prev_dir / "ema").is_dir() else "params"
        prev = _flat(ocp.StandardCheckpointer().restore(prev_dir / item))
        teacher = _flat(items_a["frozen"]["teacher"])
        assert set(teacher) == set(prev), stage
        for name in prev:
            np.testing.assert_array_equal(np.asarray(teacher[name]), np.asarray(prev[name]),
                                          f"{stage} {name}")
        student = _flat(items_a["params"])
        shared = set(student) & set(prev)
        assert set(student) - set(prev) == (
            {n for n in student if n.startswith("guidance_embedder/")}
            if stage == "distill_cfg" else set()), stage
        moved = sum(not np.array_equal(np.asarray(student[n]), np.asarray(prev[n]))
                    for n in shared)
        assert moved > len(shared) // 2, f"{stage}: {moved} of {len(shared)} changed"


def test_posttrain_stage_needs_init_from(tmp_path):
    from avatarv_jax.training.trainer import train

    cfg = stage_config_for("distill_cfg", "")
    with pytest.raises(ValueError, match="init_from"):
        train(cfg, tmp_path / "w", data=data())
