"""Model definitions: the DiT, its motion stream, the audio and text encoders."""
