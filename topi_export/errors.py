class TopiError(Exception):
    """A user-facing error: one line naming the problem and the fix. The CLI prints it and exits 2."""
