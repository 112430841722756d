"""The one error type for bad inference input: the CLI turns it into a message and exit code 2."""


class InferenceInputError(ValueError):
    """An input the pipeline cannot use (missing or unreadable file, silent audio, a reference
    that is too short, an unknown language, a checkpoint that does not fit the config...)."""
