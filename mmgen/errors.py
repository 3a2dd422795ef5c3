"""User-facing errors.

Every problem caused by the user's input (a bad path, a misspelled config key, an undecodable file)
is raised as :class:`MMGenError` with a one-line message that says what is wrong and how to fix it.
The CLI prints it as ``error: <message>`` and exits with status 2 instead of a traceback.
"""


class MMGenError(Exception):
    """A problem with the user's input, reported as one line."""

    def __init__(self, message: str):
        # Collapse to one line: the CLI promises one-line errors.
        super().__init__(" ".join(str(message).split()))


class MediaError(MMGenError):
    """A media item could not be read or decoded (missing file, corrupt bytes, unknown format).

    ``reason`` is the quarantine reason code: ``undecodable_media`` unless the cause is known more
    precisely (``too_many_pixels``, ``truncated_image``, ``format_mismatch``, ``not_an_image``, ...)."""

    default_reason = "undecodable_media"

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason or self.default_reason

    def __reduce__(self):  # keeps the reason when a worker process hands the error back
        return type(self), (self.args[0], self.reason)


class NotFetchedError(MediaError):
    """A media item is a URL reference whose bytes were never downloaded (``mmgen fetch`` gets them)."""

    default_reason = "not_fetched"


class LossyConversionError(MMGenError):
    """A Doc cannot be written in the target format without losing information."""
