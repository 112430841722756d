"""The trainer of stages 1-3: optimizer, state, jitted step, checkpoints, surgery, guard,
metrics, samples and the loop (``trainer.train``)."""
