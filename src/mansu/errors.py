"""The one exception type for user mistakes: the CLI prints its message, never a traceback."""


class MansuError(ValueError):
    """Bad input (data, model name, option, unsupported architecture) explained in one sentence."""
