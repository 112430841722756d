"""Stage config: distill_cfg (DESIGN §5, docs/training.md); arg = model preset.

    python train.py --config configs/distill_cfg.py:tiny --workdir /tmp/distill_cfg --config.init_from=<previous stage>
"""

from avatarv_jax.training.stage_config import stage_config


def get_config(arg: str = "tiny"):
    return stage_config("distill_cfg", arg or "tiny")
