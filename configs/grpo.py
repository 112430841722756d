"""Stage config: grpo (DESIGN §5, docs/training.md); arg = model preset.

    python train.py --config configs/grpo.py:tiny --workdir /tmp/grpo --config.init_from=<previous stage>
"""

from avatarv_jax.training.stage_config import stage_config


def get_config(arg: str = "tiny"):
    return stage_config("grpo", arg or "tiny")
