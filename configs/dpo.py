"""Stage config: dpo (DESIGN §5, docs/training.md); arg = model preset.

    python train.py --config configs/dpo.py:tiny --workdir /tmp/dpo --config.init_from=<previous stage>
    # on human preference pairs (JSONL: reference, audio, preferred, rejected, caption):
    python train.py --config configs/dpo.py:tiny --workdir /tmp/dpo --config.init_from=<previous stage> \
        --config.dpo.pairs=/data/prefs/pairs.jsonl
"""

from avatarv_jax.training.stage_config import stage_config


def get_config(arg: str = "tiny"):
    return stage_config("dpo", arg or "tiny")
