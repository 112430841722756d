"""The `tiny` model. Base model: `--config configs/tiny.py`; SR refiner: `configs/tiny.py:sr`."""

from avatarv_jax.config import get_model_config


def get_config(arg: str = ""):
    return get_model_config("tiny", arg or "")
