"""The package installs as one distribution with kernels/ under avatarv_jax.kernels, and the
thin CLIs check their input."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_non_editable_install_ships_kernels(tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps",
                    "--disable-pip-version-check", "--target", str(target), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    assert not (target / "kernels").exists()        # no top-level `kernels` package
    assert (target / "avatarv_jax/data/avatarworld/assets/probe.safetensors").exists()
    assert (target / "avatarv_jax/eval/assets/syncnet_avatarworld.safetensors").exists()
    code = ("import avatarv_jax.kernels as k; from avatarv_jax.kernels import SRALayout; "
            "print(k.__file__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, env=dict(os.environ, PYTHONPATH=str(target)), timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().startswith(str(target / "avatarv_jax" / "kernels"))


def _run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)


def test_train_prints_plan():
    out = _run("train.py", "--config", "configs/tiny.py", "--config.model.num_layers=3")
    assert out.returncode == 0, out.stderr
    assert "Wan 2.1-compatible part" in out.stdout and "mesh" in out.stdout


def test_infer_rejects_bad_resolution():
    out = _run("infer.py", "--resolution", "30")
    assert out.returncode != 0
    assert "not a multiple of 16" in out.stderr


def test_demo_runs_end_to_end():
    from avatarv_jax.config import get_model_config
    from avatarv_jax.inference.demo import run_demo

    lines = []
    result = run_demo(get_model_config("tiny"), steps=1, size=32, ref_frames=5, gen_frames=5,
                      log=lines.append)
    assert result["video_shape"] == (1, 5, 32, 32, 3)
    assert result["latent_shape"] == (1, 2, 4, 4, 16)
    assert any("RefCache" in line for line in lines)
