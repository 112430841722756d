"""The `avatar_v_1_3b` model. Base model: `--config configs/avatar_v_1_3b.py`; SR refiner: `configs/avatar_v_1_3b.py:sr`."""

from avatarv_jax.config import get_model_config


def get_config(arg: str = ""):
    return get_model_config("avatar_v_1_3b", arg or "")
