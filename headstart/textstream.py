"""Token ids to text deltas a client can be sent, with stop strings.

Text is held back while it could still be the start of a stop string or while the last
token ends inside a multi-byte character, so a client never sees text it must take back.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class TextStream:
    """Accumulates generated ids and releases the text that is final."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add one token; return the newly final text (maybe empty)."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = self.text.find(s)
            if at != -1:
                self.text = self.text[:at]
                self.stopped = True
        if self.stopped:
            return self._release(len(self.text))
        safe = len(self.text)
        if self.text.endswith("\ufffd"):
            safe = len(self.text.rstrip("\ufffd"))
        for s in self.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if self.text[:safe].endswith(s[:k]):
                    safe -= k
                    break
        return self._release(safe)

    def finish(self) -> str:
        """Whatever was held back, now that no token follows."""
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= len(self.sent):
            return ""
        delta = self.text[len(self.sent) : upto]
        self.sent = self.text[:upto]
        return delta
