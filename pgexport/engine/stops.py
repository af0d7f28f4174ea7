"""Stop strings over streamed text: what may be handed out now, and where the answer ends.

A stop string can arrive split across tokens ("##" as "#" then "#"), so text that could be the
start of one is held back until the next piece settles it. The stop string itself is never part
of the answer (OpenAI's `stop`).

    >>> stops = StopText(["\\n\\n", "END"])
    >>> stops.feed("a red"), stops.feed(" circle E"), stops.feed("ND more")
    (('a red', False), (' circle ', False), ('', True))
"""

from __future__ import annotations


class StopText:
    """The text of one answer, fed piece by piece; `feed` returns (text safe to emit, stopped)."""

    def __init__(self, stops: list[str] | tuple[str, ...] = ()):
        self.stops = [s for s in stops if s]
        self.text = ""  # everything fed so far
        self.emitted = 0  # characters of `text` handed out
        self.stopped = False

    def feed(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.text += piece
        if not self.stops:
            out, self.emitted = self.text[self.emitted:], len(self.text)
            return out, False
        # The earliest stop string that starts at or after what is already out (a stop string
        # cannot start inside emitted text: that text was checked to hold no stop prefix).
        hits = [i for i in (self.text.find(s, max(0, self.emitted - len(s) + 1)) for s in self.stops) if i >= 0]
        if hits:
            end = min(hits)
            out = self.text[self.emitted:end]
            self.text, self.emitted, self.stopped = self.text[:end], end, True
            return out, True
        # Hold back the longest tail that is the start of a stop string.
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        safe = len(self.text) - hold
        out = self.text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return out, False

    def finish(self) -> str:
        """The held-back tail once the answer ended without a stop string."""
        out, self.emitted = self.text[self.emitted:], len(self.text)
        return out
