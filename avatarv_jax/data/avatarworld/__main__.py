"""``python -m avatarv_jax.data.avatarworld``: see cli.py."""

import sys

from avatarv_jax.data.avatarworld.cli import main

sys.exit(main())
