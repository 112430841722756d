"""Stage config: grpo (DESIGN §5, docs/training.md); arg = model preset.

    python train.py --config configs/grpo.py:tiny --workdir /tmp/grpo --config.init_from=<previous stage>
    # rewards on real video (data with face/mouth masks) instead of the AvatarWorld probe's:
    #   --config.grpo.reward_weights.lse_c=1 --config.grpo.reward_weights.face_similarity=1 \
    #   --config.grpo.reward_weights.lip_sync=0 --config.grpo.reward_weights.identity=0 \
    #   --config.grpo.reward_weights.motion_style=0
"""

from avatarv_jax.training.stage_config import stage_config


def get_config(arg: str = "tiny"):
    return stage_config("grpo", arg or "tiny")
