"""Token ids to text, incrementally: what to send to a streaming client after each token.

The whole reply is decoded each time and the new suffix is sent, except a suffix that may still
change: an incomplete UTF-8 sequence (decoded as U+FFFD) or the start of a stop string.
"""

from __future__ import annotations

from typing import Callable, Sequence


class TextStream:
    """Accumulates reply token ids; :meth:`push` returns newly final text, :attr:`stopped` a stop-string hit."""

    def __init__(self, decode: Callable[[Sequence[int]], str], stop: Sequence[str] = ()) -> None:
        self.decode = decode
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""  # the reply so far (cut at a stop string)
        self.sent = 0  # characters of ``text`` already returned
        self.stopped = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        self.text = self.decode(self.ids)
        for s in self.stop:
            at = self.text.find(s)
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        if self.stopped:
            return self.flush()
        hold = len(self.text)
        if self.text.endswith("\ufffd"):  # a multi-byte character still arriving
            hold = len(self.text.rstrip("\ufffd"))
        for s in self.stop:  # a stop string may be starting at the end
            for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:k]):
                    hold = min(hold, len(self.text) - k)
                    break
        return self._emit(max(hold, self.sent))

    def flush(self) -> str:
        """Everything not yet returned (the reply is over)."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        out = self.text[self.sent:upto]
        self.sent = max(self.sent, upto)
        return out
