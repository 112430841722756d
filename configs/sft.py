"""Stage config: sft (DESIGN §5); arg = model preset.

    python train.py --config configs/sft.py:tiny --workdir /tmp/sft
"""

from avatarv_jax.training.stage_config import stage_config


def get_config(arg: str = "tiny"):
    return stage_config("sft", arg or "tiny")
