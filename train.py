"""Train a stage of Avatar V (DESIGN §5): T2V, A2V or personality SFT.

    python train.py --config configs/t2v.py:tiny --workdir /tmp/t2v
    python train.py --config configs/a2v.py:tiny --workdir /tmp/a2v --config.init_from=/tmp/t2v
    python train.py --config configs/sft.py:tiny --workdir /tmp/sft --config.init_from=/tmp/a2v
    python train.py --config configs/t2v.py:tiny --workdir /tmp/smoke \\
        --config.train.synthetic_data=True --config.train.num_steps=20

With a model config (``configs/tiny.py``, ...) it prints the plan (parameter counts, mesh,
rules) and trains nothing. Running it again with the same workdir resumes from the latest checkpoint (parameters,
optimizer, EMA, data position). SIGTERM saves a checkpoint and exits with status 0. Bad input
(config, init_from, data) exits with status 2. Multi-host: ``--config.train.distributed=True``
calls ``jax.distributed.initialize()`` (TPU pods and SLURM/GPU clusters configure themselves
from the environment). See docs/training.md.
"""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "stage config: "
                                          "configs/<t2v|a2v|sft>.py:<model> (a model config "
                                          "prints the plan only)", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, metrics, samples and config.json")

BAD_INPUT = 2


def print_plan(cfg) -> int:
    """A model config: parameter counts, mesh and rules, without allocating the model."""
    import jax

    from avatarv_jax.models import factory
    from avatarv_jax.parallel.mesh import make_mesh
    from avatarv_jax.tools.param_count import count_all, format_report

    try:
        factory.check_compatible(cfg)
        mesh = make_mesh(dict(cfg.mesh))
    except ValueError as e:
        print(f"train.py: {e}", file=sys.stderr)
        return BAD_INPUT
    print(format_report(count_all(cfg)))
    print(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
          f"device(s)")
    print("logical axis rules:", dict(cfg.logical_axis_rules))
    print("This is a model config: nothing was trained. Train a stage with "
          "--config configs/<t2v|a2v|sft>.py:<model> --workdir DIR.")
    return 0


def main(argv):
    if len(argv) > 1:
        print(f"train.py: unexpected arguments {argv[1:]}", file=sys.stderr)
        return BAD_INPUT
    cfg = _CONFIG.value
    if "stage" not in cfg or "train" not in cfg:
        return print_plan(cfg)
    if not _WORKDIR.value:
        print("train.py: --workdir is required to train", file=sys.stderr)
        return BAD_INPUT
    logging.set_verbosity(logging.WARNING)     # Orbax logs every save at INFO
    import jax

    if cfg.train.distributed:
        jax.distributed.initialize()
    from avatarv_jax.training.checkpoints import CheckpointMismatchError
    from avatarv_jax.training.guard import NonFiniteLossError
    from avatarv_jax.training.trainer import train

    try:
        train(cfg, _WORKDIR.value)
    except (ValueError, FileNotFoundError, CheckpointMismatchError) as e:
        print(f"train.py: {e}", file=sys.stderr)
        return BAD_INPUT
    except NonFiniteLossError as e:
        print(f"train.py: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    app.run(main)
