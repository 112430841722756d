"""Stage config: distill_sr, the SR refiner distilled to one step by DMD (DESIGN §4);
arg = model preset.

    python train.py --config configs/distill_sr.py:tiny --workdir /tmp/distill_sr --config.init_from=<sr workdir>
"""

from avatarv_jax.training.stage_config import stage_config


def get_config(arg: str = "tiny"):
    return stage_config("distill_sr", arg or "tiny")
