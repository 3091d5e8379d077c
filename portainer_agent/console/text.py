"""Docker's terminal bytes -> websocket text, exactly (pure, no I/O).

Websocket text frames must each hold valid UTF-8, and strict clients (websocket-client,
browsers) reject a frame that ends in the middle of a character. Docker's reads end
anywhere, so the bytes are decoded incrementally: a character split across two reads
is held back until it is complete, and bytes that are not UTF-8 at all become U+FFFD
instead of vanishing (the original 2.x drops them; 1.x also pads every frame with NULs).
"""
from __future__ import annotations

import codecs


class TerminalText:
    """Incremental UTF-8 decoder for one console stream."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        """Text for ``data``; an incomplete trailing character waits for the next read."""
        return self._decoder.decode(data)

    def end(self) -> str:
        """The stream ended: a dangling partial character becomes U+FFFD."""
        return self._decoder.decode(b"", final=True)
