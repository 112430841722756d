"""Shared fixtures."""

import pytest

from avatarv_jax.testing import tiny_dit_config


@pytest.fixture(scope="session")
def tiny_cfg():
    return tiny_dit_config()
