"""Post-training of the DiT (stages 4-5, DESIGN §5): guidance distillation, distribution-matching
distillation, Flow-GRPO and Diffusion-DPO.

The algorithm modules (``guidance_distill``, ``dmd``, ``sde``, ``grpo``, ``dpo``) are pure,
model-agnostic functions over velocity functions and latent pytrees; ``toy`` is the 2-D
mixture-of-Gaussians problem with an exact velocity that the tests check them on; ``stages``
and ``rewards`` plug them into the DiT trainer.
"""
