"""Train an Avatar V model (stages 1-5 of DESIGN §5).

The sharded, checkpointed trainer has not landed yet: this command checks the config, builds
the mesh and prints the plan (model sizes, mesh, logical axis rules, objective) without
allocating the model.

    python train.py --config configs/tiny.py --workdir /tmp/avatarv
"""

import jax
from absl import app, flags
from ml_collections import config_flags

from avatarv_jax.models import factory
from avatarv_jax.parallel.mesh import make_mesh
from avatarv_jax.tools.param_count import count_all, format_report

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "config file",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "where checkpoints and logs will go")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    cfg = _CONFIG.value
    factory.check_compatible(cfg)
    mesh = make_mesh(dict(cfg.mesh))
    print(format_report(count_all(cfg)))
    print(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} "
          f"device(s)")
    print("logical axis rules:", dict(cfg.logical_axis_rules))
    print("flow matching:", dict(cfg.flow))
    print("condition dropout:", dict(cfg.dropout))
    print(f"workdir: {_WORKDIR.value or '(none given)'}")
    print("The trainer (train step, Orbax checkpoints, Grain input) is not implemented yet; "
          "nothing was trained.")


if __name__ == "__main__":
    app.run(main)
