"""Stage config: distill_dmd (DESIGN §5, docs/training.md); arg = model preset.

    python train.py --config configs/distill_dmd.py:tiny --workdir /tmp/distill_dmd --config.init_from=<previous stage>
"""

from avatarv_jax.training.stage_config import stage_config


def get_config(arg: str = "tiny"):
    return stage_config("distill_dmd", arg or "tiny")
