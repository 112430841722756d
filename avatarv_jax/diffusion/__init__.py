"""Flow matching: timestep sampling, the loss, samplers and classifier-free guidance."""
