"""User-facing errors: one line naming the problem and the fix. The CLI prints ``error: <message>`` and exits 2.
The subclasses say what kind of fix it takes, for callers that handle errors in code (the Triton loop model, the
diffusers drop-in, scripts)."""


class TopiError(Exception):
    """A user-facing error: one line naming the problem and the fix."""


class BadInput(TopiError):
    """A flag, file, request or tensor the user gave is wrong."""


class RebuildNeeded(TopiError):
    """An engine directory, cache or repository is stale, edited or damaged: rebuild it."""


class BackendUnavailable(TopiError):
    """A backend (or a package it needs, or the hardware it runs on) is not available here."""
