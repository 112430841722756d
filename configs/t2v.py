"""Stage config: t2v (DESIGN §5); arg = model preset.

    python train.py --config configs/t2v.py:tiny --workdir /tmp/t2v
"""

from avatarv_jax.training.stage_config import stage_config


def get_config(arg: str = "tiny"):
    return stage_config("t2v", arg or "tiny")
