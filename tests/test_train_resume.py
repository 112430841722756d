"""Exact resume: N steps straight == N/2 steps, SIGTERM, resume (fp32, CPU), and the CLI."""

import os
import subprocess
import sys
import textwrap

import jax
import numpy as np

from avatarv_jax.training.checkpoints import resolve_step_dir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_STEPS = 6

# The child trains straight to NUM_STEPS in workdir A, then again in workdir B with a data
# stream that sends SIGTERM to its own process while step 3 runs: the trainer must save and
# return cleanly at that step. The parent resumes B and compares with A.
CHILD = textwrap.dedent("""
    import sys
    from avatarv_jax.training.trainer import train
    sys.path.insert(0, {root!r})
    from tests.test_train_resume import data, tiny_config

    straight = train(tiny_config(), sys.argv[1], data=data())
    killed = train(tiny_config(), sys.argv[2], data=data(kill_at=2))
    print("RESULT", straight["step"], straight["stopped"], killed["step"], killed["stopped"])
""")


def data(kill_at=None):
    """Synthetic t2v latents; batch ``kill_at`` sends SIGTERM to this process when drawn."""
    from avatarv_jax.testing import sigterm_at
    from avatarv_jax.training.synthetic import synthetic_dataset

    return sigterm_at(synthetic_dataset("t2v", num_batches=NUM_STEPS, batch_size=2,
                                        num_frames=5, ref_frames=1, resolution=32, text_len=8,
                                        latent_shape=(4, 4, 16)), kill_at)


def tiny_config():
    from avatarv_jax.testing import quick_stage_config
    return quick_stage_config("t2v", NUM_STEPS, warmup_steps=2)


def _params(workdir):
    import orbax.checkpoint as ocp
    step_dir = resolve_step_dir(workdir)
    out = {}
    for item in ("params", "ema", "opt_state"):
        out[item] = ocp.StandardCheckpointer().restore(step_dir / item)
    return int(step_dir.name), out


def test_sigterm_then_resume_equals_straight_run(tmp_path):
    from avatarv_jax.training.trainer import train

    a, b = tmp_path / "straight", tmp_path / "killed"
    child = CHILD.format(root=ROOT)
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", child, str(a), str(b)], env=env,
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = proc.stdout.split("RESULT")[1].split()
    assert result[:2] == [str(NUM_STEPS), "done"]
    killed_at = int(result[2])
    assert result[3] == "sigterm" and 1 <= killed_at < NUM_STEPS, result
    assert resolve_step_dir(b).name == str(killed_at)

    # Resume B in this process: the restored Grain iterator continues with batch killed_at.
    resumed = train(tiny_config(), b, data=data())
    assert resumed["step"] == NUM_STEPS and resumed["stopped"] == "done"

    step_a, trees_a = _params(a)
    step_b, trees_b = _params(b)
    assert step_a == step_b == NUM_STEPS
    for item in trees_a:
        leaves_a, leaves_b = jax.tree.leaves(trees_a[item]), jax.tree.leaves(trees_b[item])
        assert len(leaves_a) == len(leaves_b) > 0
        for x, y in zip(leaves_a, leaves_b):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=item)
    # The metrics log holds every step once per run segment, the resumed one from killed_at+1.
    lines = (b / "metrics.jsonl").read_text().splitlines()
    steps = [int(l.split('"step": ')[1].split(",")[0]) for l in lines]
    assert steps == list(range(1, killed_at + 1)) + list(range(killed_at + 1, NUM_STEPS + 1))


def test_cli_bad_input_exits_2(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = lambda *args: subprocess.run(
        [sys.executable, "train.py", *args], env=env, capture_output=True, text=True,
        timeout=300, cwd=ROOT)
    proc = run("--config", "configs/t2v.py:tiny", "--workdir", str(tmp_path / "w"),
               "--config.train.synthetic_data=True", f"--config.init_from={tmp_path}/none")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "holds no checkpoint" in proc.stderr
    proc = run("--config", "configs/sft.py:tiny")
    assert proc.returncode == 2 and "--workdir is required" in proc.stderr, proc.stderr[-2000:]
    proc = run("--config", "configs/sft.py:huge", "--workdir", str(tmp_path / "w"))
    assert proc.returncode != 0 and "unknown model 'huge'" in proc.stderr, proc.stderr[-2000:]
