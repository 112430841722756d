"""The shipped demo checkpoint (checkpoints/demo/): what infer.py uses when given no checkpoint.

It must stay small, hold only what inference needs, restore into the models of its own
``config.json`` (the config infer.py takes from it) without a single name or shape mismatch,
and decode with a trained VAE: the bundled example, encoded and decoded, comes back as a face.
"""

import json

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from avatarv_jax.config import get_model_config
from avatarv_jax.inference import weights
from avatarv_jax.inference.media import read_video
from avatarv_jax.inference.pipeline import resolve_config
from avatarv_jax.training import checkpoints

DEMO = weights.DEMO_CHECKPOINT
MAX_BYTES = 50 * 1024 * 1024
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _flat(module) -> dict[str, np.ndarray]:
    return {"/".join(map(str, path)): np.asarray(var.value)
            for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}


def test_demo_checkpoint_is_small_and_holds_only_inference_items():
    assert DEMO.is_dir(), f"{DEMO} is missing: infer.py would fall back to random weights"
    size = sum(p.stat().st_size for p in DEMO.rglob("*") if p.is_file())
    assert 0 < size <= MAX_BYTES, f"demo checkpoint is {size / 2**20:.1f} MB (limit 50 MB)"
    step_dir = checkpoints.resolve_step_dir(DEMO)
    items = {p.name for p in step_dir.iterdir() if p.is_dir()}
    assert {"params", "ema", "frozen"} <= items
    assert not items & {"opt_state", "data"}, f"training-only items shipped: {items}"
    meta = json.loads((step_dir / "train" / "metadata").read_text())
    assert meta["stage"] == "sft" and meta["step"] > 0


def test_default_config_is_the_demo_config_with_the_tiny_dit():
    cfg = resolve_config(None, None)
    tiny = get_model_config("tiny")
    assert cfg.name == "tiny" and cfg.stage == "sft"
    as_json = lambda c: json.loads(json.dumps(c.to_dict()))     # tuples -> lists
    assert as_json(cfg.model) == as_json(tiny.model)        # the same DiT as the preset
    assert cfg.vae == "tiny_s4"                             # the stride-4 VAE it was trained on
    assert weights.default_checkpoint() == DEMO


def test_demo_vae_reconstructs_the_bundled_example():
    """A random VAE returns about 8.6 dB; the demo's trained one well above 18 dB."""
    cfg = resolve_config(None, None)
    models = weights.random_models(cfg, seed=0)
    weights.load_weights(models, None, log=lambda m: None)
    clip = read_video(EXAMPLES / "reference.mp4", (64, 64), max_frames=25)
    video = jnp.asarray(clip.frames[None, :21], jnp.float32) / 127.5 - 1.0    # 1 + 4k frames
    vae = models["vae"]
    back = jnp.clip(vae.decode(vae.encode(video)), -1.0, 1.0)
    mse = float(jnp.mean(((back - video) / 2.0) ** 2))          # on the [0, 1] scale
    psnr = -10.0 * np.log10(mse)
    assert psnr > 18.0, f"demo VAE reconstructs the example at {psnr:.1f} dB"


def test_demo_restores_into_its_config_models_without_mismatch():
    cfg = resolve_config(None, None)
    models = weights.random_models(cfg, seed=3)
    before = {name: _flat(m) for name, m in models.items()}
    info = weights.load_weights(models, None, log=lambda m: None)   # None -> the demo
    assert info.kind == "trainer" and info.step and info.step > 0
    step_dir = checkpoints.resolve_step_dir(DEMO)
    # Every model came from the checkpoint: nothing kept its random initial value...
    for name in ("dit", "text_encoder", "audio_encoder", "vae"):
        after = _flat(models[name])
        assert after.keys() == before[name].keys()
        changed = [k for k in after if not np.array_equal(after[k], before[name][k])]
        assert len(changed) == len(after), f"{name}: {set(after) - set(changed)} not restored"
    # ... and the DiT holds the EMA weights, bit for bit.
    saved = checkpoints.read_item_shapes(step_dir, "ema")
    assert set(saved) == set(_flat(models["dit"]))
    ema = ocp.StandardCheckpointer().restore(step_dir / "ema")
    flat_ema = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
                for path, v in jax.tree_util.tree_flatten_with_path(ema)[0]}
    dit = _flat(models["dit"])
    for k, v in flat_ema.items():
        np.testing.assert_array_equal(dit[k], v, err_msg=k)


def test_demo_does_not_fit_another_width():
    cfg = get_model_config("tiny")
    cfg.model.dim = 96
    models = {"dit": weights.random_models(cfg)["dit"]}
    with pytest.raises(checkpoints.CheckpointMismatchError, match="checkpoint shape"):
        checkpoints.restore_models(DEMO, models)
