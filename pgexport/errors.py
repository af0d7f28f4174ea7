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


def one_line(error: BaseException, limit: int = 200) -> str:
    """The first line of another library's error message, to quote inside a `PgExportError`.

    ONNX Runtime and safetensors put stack traces and operator dumps after the first line.

        >>> one_line(ValueError("bad header\\n  at offset 8"))
        'bad header'
    """
    lines = [" ".join(ln.split()) for ln in str(error).splitlines() if ln.strip()]
    return lines[0][:limit] if lines else type(error).__name__
