"""The one exception type for user mistakes, and the one warning type for doubtful input: the CLI prints their
messages, never a traceback or a source location."""


class MansuError(ValueError):
    """Bad input (data, model name, option, unsupported architecture) explained in one sentence."""


class MansuWarning(UserWarning):
    """Input the edit can run on but a user should hear about (e.g. a relation no retain item keeps)."""
