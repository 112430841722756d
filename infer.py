"""Generate a talking-avatar video.

Until the inference pipeline lands this runs the bundled demo: the tiny model end to end
(text, audio and reference encoding, RefCache, one guided sampling pass, VAE decode), printing
shapes and timings.

    python infer.py                               # the tiny model, random weights
    python infer.py --config configs/tiny.py --steps 8
"""

from absl import app, flags
from ml_collections import config_flags

from avatarv_jax.inference.demo import run_demo

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "model config file",
                                          lock_config=False)
_STEPS = flags.DEFINE_integer("steps", None, "sampling steps (default: the config's)")
_SEED = flags.DEFINE_integer("seed", 0, "random seed")
_RESOLUTION = flags.DEFINE_integer("resolution", 64, "square output size in pixels (multiple of 16)")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _RESOLUTION.value % 16:
        raise app.UsageError(f"--resolution {_RESOLUTION.value} is not a multiple of 16")
    run_demo(_CONFIG.value, seed=_SEED.value, steps=_STEPS.value, size=_RESOLUTION.value)


if __name__ == "__main__":
    app.run(main)
