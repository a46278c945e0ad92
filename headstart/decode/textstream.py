"""Token ids to text deltas a client can be sent, with stop strings.

Text is held back while it could still be the start of a stop string or while the last
token ends inside a multi-byte character, so a client never sees text it must take back.

Each token is decoded with only a few tokens before it (offsets into the ids, as
vLLM does), not the whole answer again: ``prefix`` is where the window starts and
``read`` where its already-decoded part ends. Both stay on character boundaries, since
they move only when the window decodes to whole characters, so the pieces join up to
what a decode of all the ids gives.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


class TextStream:
    """Accumulates generated ids and releases the text that is final."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self._longest_stop = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False
        self.text = ""
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _advance(self, final: bool) -> None:
        """Add the text of the ids past ``read`` once it is whole characters (or at the end)."""
        window = self._decode(self.ids[self._prefix :])
        known = self._decode(self.ids[self._prefix : self._read])
        if len(window) <= len(known) and not final:
            return
        if window.endswith("\ufffd") and not final:
            return  # the last token ends inside a character: wait for the rest of its bytes
        self.text += window[len(known) :]
        self._prefix, self._read = self._read, len(self.ids)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly final text (maybe empty)."""
        if self.stopped:
            return ""
        before = len(self.text)
        self.ids.append(token_id)
        self._advance(final=False)
        self._cut_at_stop(before)
        if self.stopped:
            return self._release(len(self.text))
        safe = len(self.text)
        for s in self.stop:
            for k in range(min(len(s) - 1, safe), 0, -1):
                if self.text.endswith(s[:k], 0, safe):
                    safe -= k
                    break
        return self._release(safe)

    def _cut_at_stop(self, before: int) -> None:
        """End the text at the first stop string, looking only where new text could complete one."""
        if not self.stop or self.stopped:
            return
        start = max(0, before - self._longest_stop + 1)
        hits = [at for at in (self.text.find(s, start) for s in self.stop) if at != -1]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def finish(self) -> str:
        """Whatever was held back, now that no token follows."""
        if not self.stopped and self._read < len(self.ids):
            before = len(self.text)
            self._advance(final=True)
            self._cut_at_stop(before)
        return self._release(len(self.text))

    def _release(self, upto: int) -> str:
        if upto <= len(self.sent):
            return ""
        delta = self.text[len(self.sent) : upto]
        self.sent = self.text[:upto]
        return delta
