"""The `avatar_v_14b` model. Base model: `--config configs/avatar_v_14b.py`; SR refiner: `configs/avatar_v_14b.py:sr`."""

from avatarv_jax.config import get_model_config


def get_config(arg: str = ""):
    return get_model_config("avatar_v_14b", arg or "")
