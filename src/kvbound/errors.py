"""User-facing errors: one clear line, never a traceback at the CLI."""


class KVBoundError(ValueError):
    """Bad input or an unusable model/file. The message is one line that says what to do."""
