"""Stage config: a2v (DESIGN §5); arg = model preset.

    python train.py --config configs/a2v.py:tiny --workdir /tmp/a2v
"""

from avatarv_jax.training.stage_config import stage_config


def get_config(arg: str = "tiny"):
    return stage_config("a2v", arg or "tiny")
