"""The NaN/Inf guard's host side.

The step itself (``step.py``) skips the update of a non-finite loss or gradient and counts
bad steps in a row in ``TrainState.bad_steps``; this stops the run with a message that says
what happened once the count reaches the limit, instead of training on garbage or silently
looping.
"""

from __future__ import annotations


class NonFiniteLossError(RuntimeError):
    """Too many non-finite steps in a row."""


def check_bad_steps(bad_steps: int, *, step: int, limit: int, metrics: dict) -> bool:
    """True when this step was skipped; raises NonFiniteLossError at ``limit`` in a row."""
    if bad_steps <= 0:
        return False
    if limit > 0 and bad_steps >= limit:
        raise NonFiniteLossError(
            f"stopping at step {step}: {bad_steps} steps in a row had a non-finite loss or "
            f"gradient (loss {metrics.get('loss')}, grad norm {metrics.get('grad_norm')}); "
            "their updates were skipped. Check the data of these steps, lower the learning "
            "rate or raise optimizer.clip_norm; train.max_bad_steps sets this limit.")
    return True
