"""Stage config: sr, the identity-aware SR refiner (DESIGN §4, docs/training.md); arg = model
preset. Data: SFT shards rendered at ``inference.sr_scale`` x the base resolution.

    python train.py --config configs/sr.py:tiny --workdir /tmp/sr [--config.init_from=<sft workdir>]
"""

from avatarv_jax.training.stage_config import stage_config


def get_config(arg: str = "tiny"):
    return stage_config("sr", arg or "tiny")
