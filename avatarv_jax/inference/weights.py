"""Model weights for inference: a trainer checkpoint, converted checkpoints, or fresh weights.

``--checkpoint`` accepts

- a trainer work directory or one of its step directories (``WORKDIR/checkpoints/<step>``),
  restored through ``avatarv_jax.training.checkpoints.restore_models`` (EMA weights when
  present); the work directory's ``config.json`` is the config when none is given;
- a directory written by ``python -m avatarv_jax.io.convert`` (its kind says which model:
  ``wan_dit`` -> DiT, ``wan_vae`` -> VAE, ``umt5`` -> text encoder), or a directory holding
  several of them as subdirectories.

With no checkpoint, ``checkpoints/demo/`` (the trainer's demo run) is used when it exists;
otherwise the models keep their random initial weights and the output is noise.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import ml_collections
from flax import nnx

from avatarv_jax.inference.errors import InferenceInputError

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_CHECKPOINT = REPO_ROOT / "checkpoints" / "demo"
CONVERTED_MARKER = "avatarv_convert.json"
CONVERTED_KINDS = {"wan_dit": "dit", "wan_vae": "vae", "umt5": "text_encoder"}
RANDOM_WEIGHTS_WARNING = ("no checkpoint given and no checkpoints/demo/: running with random "
                          "weights, the output is noise until the model is trained")


@dataclasses.dataclass
class WeightsInfo:
    """What the models were loaded from (recorded in the sidecar JSON)."""

    kind: str                      # "trainer", "converted" or "random"
    path: str | None = None
    step: int | None = None
    restored: tuple[str, ...] = ()
    warning: str | None = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def default_checkpoint() -> Path | None:
    return DEMO_CHECKPOINT if DEMO_CHECKPOINT.is_dir() else None


def _converted_dirs(path: Path) -> list[Path]:
    if (path / CONVERTED_MARKER).is_file():
        return [path]
    return sorted(p for p in path.iterdir() if (p / CONVERTED_MARKER).is_file())


def checkpoint_config(path) -> ml_collections.ConfigDict | None:
    """The ``config.json`` a trainer wrote beside a work directory or step directory, if any."""
    path = Path(path)
    for folder in (path, path.parent, path.parent.parent):
        file = folder / "config.json"
        if file.is_file():
            try:
                cfg = ml_collections.ConfigDict(json.loads(file.read_text()))
            except (ValueError, TypeError) as e:
                raise InferenceInputError(f"cannot read the checkpoint's config {file}: {e}") \
                    from None
            return _with_model_defaults(cfg)
    return None


def _with_model_defaults(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """DiT fields added after the checkpoint was written take their defaults (a checkpoint
    from before ``guidance_embed`` existed has no guidance embedding)."""
    if "model" not in cfg:
        return cfg
    from avatarv_jax.models.dit import DiTConfig
    with cfg.unlocked():
        for name, field in DiTConfig.__dataclass_fields__.items():
            if name not in cfg.model:
                cfg.model[name] = field.default
    return cfg


def check_checkpoint(checkpoint) -> None:
    """Fail fast (before any model is built) on a checkpoint path that cannot be one."""
    if checkpoint is None:
        return
    path = Path(checkpoint)
    if not path.exists():
        raise InferenceInputError(f"checkpoint not found: {path}")
    if not path.is_dir():
        raise InferenceInputError(f"checkpoint must be a directory: {path}")


def load_weights(models: dict[str, nnx.Module], checkpoint, *, log=print) -> WeightsInfo:
    """Restore ``checkpoint`` into ``models`` in place (see the module docstring).

    ``checkpoint=None`` uses the demo checkpoint when it exists, else keeps random weights.
    A checkpoint that does not fit the models raises ``InferenceInputError`` naming the first
    mismatching parameters.
    """
    if checkpoint is None:
        checkpoint = default_checkpoint()
        if checkpoint is None:
            log(f"WARNING: {RANDOM_WEIGHTS_WARNING}")
            return WeightsInfo("random", warning=RANDOM_WEIGHTS_WARNING)
        log(f"using the demo checkpoint {checkpoint}")
    check_checkpoint(checkpoint)
    path = Path(checkpoint)
    converted = _converted_dirs(path)
    if converted:
        return _load_converted(models, path, converted)
    return _load_trainer(models, path)


def _load_converted(models, path: Path, dirs: list[Path]) -> WeightsInfo:
    from avatarv_jax.io import convert

    restored = []
    for folder in dirs:
        kind = convert.read_metadata(folder)["kind"]
        name = CONVERTED_KINDS.get(kind)
        if name is None or name not in models:
            raise InferenceInputError(f"converted checkpoint {folder} holds a {kind!r} model, "
                                      f"which inference does not use (usable: "
                                      f"{', '.join(CONVERTED_KINDS)})")
        target = models[name]
        graphdef, state = nnx.split(target)
        try:
            loaded = convert.load_converted(folder, lambda: nnx.merge(graphdef, state))
        except ValueError as e:
            raise InferenceInputError(f"checkpoint {folder} does not match the config's "
                                      f"{name}: {e}") from None
        nnx.update(target, nnx.state(loaded))
        restored.append(name)
    return WeightsInfo("converted", str(path), restored=tuple(restored))


def _load_trainer(models, path: Path) -> WeightsInfo:
    try:
        from avatarv_jax.training import checkpoints
    except ImportError as e:
        raise InferenceInputError(
            f"{path} is not a converted checkpoint, and trainer checkpoints need "
            f"avatarv_jax.training.checkpoints, which cannot be imported ({e})") from None
    try:
        step_dir = checkpoints.resolve_step_dir(path)
        step = checkpoints.restore_models(step_dir, models, use_ema=True)
    except ValueError as e:          # CheckpointMismatchError is a ValueError
        raise InferenceInputError(f"checkpoint {path} does not match the config: {e}") from None
    except FileNotFoundError as e:
        raise InferenceInputError(f"no trainer checkpoint in {path}: {e}") from None
    return WeightsInfo("trainer", str(step_dir), step=int(step))


def random_models(cfg, *, seed: int = 0, text_layers: int | None = None
                  ) -> dict[str, nnx.Module]:
    """The config's models with numpy-drawn weights (normal / sqrt(fan-in), every parameter
    non-zero), for benchmarks and tests: built abstractly and filled, so nothing is compiled
    (``factory.build_models`` compiles its initialisers, seconds even for the tiny config).
    ``text_layers`` keeps the text encoder's width but cuts its depth."""
    import jax.numpy as jnp
    import numpy as np

    from avatarv_jax.models import factory
    from avatarv_jax.models.audio_encoder import AudioEncoder
    from avatarv_jax.models.dit import DiT
    from avatarv_jax.models.text_encoder import T5Encoder
    from avatarv_jax.models.vae import CausalVideoVAE

    factory.check_compatible(cfg)
    text_cfg = factory.text_encoder_config(cfg)
    if text_layers:
        text_cfg = dataclasses.replace(text_cfg, num_layers=text_layers)
    builders = {
        "dit": lambda: DiT(factory.dit_config(cfg), rngs=nnx.Rngs(0)),
        "text_encoder": lambda: T5Encoder(text_cfg, nnx.Rngs(0)),
        "audio_encoder": lambda: AudioEncoder(factory.audio_encoder_config(cfg), nnx.Rngs(0)),
        "vae": lambda: CausalVideoVAE(factory.vae_config(cfg), rngs=nnx.Rngs(0)),
    }
    rng = np.random.default_rng(seed)
    models = {}
    for name, build in builders.items():
        module = nnx.eval_shape(build)
        filled = []
        for path, var in nnx.to_flat_state(nnx.state(module)):
            fan_in = int(np.prod(var.shape[:-1])) or 1
            value = rng.standard_normal(var.shape, np.float32) / np.sqrt(fan_in)
            filled.append((path, var.replace(value=jnp.asarray(value, var.dtype))))
        nnx.update(module, nnx.from_flat_state(filled))
        models[name] = module
    return models
