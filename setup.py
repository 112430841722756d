"""Package discovery that pyproject.toml cannot express on its own.

``kernels/`` sits at the top of the repository (beside the library, as the design asks) but is
installed as ``avatarv_jax.kernels``: the top-level name ``kernels`` belongs to another
distribution on PyPI. Everything else is declared in pyproject.toml.
"""

from setuptools import find_packages, setup

setup(
    packages=find_packages(include=["avatarv_jax", "avatarv_jax.*"]) + ["avatarv_jax.kernels"],
    package_dir={"avatarv_jax.kernels": "kernels"},
)
