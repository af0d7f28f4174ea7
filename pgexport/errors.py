"""The one exception type the user is meant to see.

Every problem caused by the user's input (a broken image, a missing tokenizer, a prompt that
does not fit) raises `PgExportError`. Its message is a single line that names the problem and
the fix, so the CLI can print it without a traceback:

    >>> raise PgExportError("cat.png is truncated; re-download or re-save the image")
    Traceback (most recent call last):
    ...
    pgexport.errors.PgExportError: cat.png is truncated; re-download or re-save the image
"""

from __future__ import annotations


class PgExportError(Exception):
    """A user-facing error: `str(error)` is one line naming the problem and the fix."""

    def __init__(self, message: str):
        # Messages often embed text from other libraries (Pillow, json) that may span lines;
        # collapse all whitespace so the CLI always prints exactly one line.
        super().__init__(" ".join(str(message).split()))
