"""A top-level JSON array read one element at a time, each with the line it starts on (for `file:line` messages).

The stdlib decoder's `raw_decode` runs over a buffer that grows a chunk at a time; an event parser (ijson) would
stream as well but cannot say on which line an element starts, and error messages must name it. Malformed JSON
inside the array is an InputError at once: there is no next element to resume at, so it cannot be skipped.
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Iterator
from typing import Any, BinaryIO

from imitate.errors import InputError

_WS = re.compile(r"[ \t\r\n]*")
UTF8_HINT = "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"


class JsonArray:
    """Elements of a top-level JSON array, one at a time, each with the line it starts on."""

    def __init__(self, f: BinaryIO, path: str, chunk: int = 1 << 20):
        self.f, self.path = f, path
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.buf, self.pos, self.line, self.eof = "", 0, 1, False
        self.base_chunk = self.chunk = chunk

    def _more(self) -> bool:
        """Append the next chunk to the buffer (dropping what was consumed). False at end of file."""
        if self.eof:
            return False
        data = self.f.read(self.chunk)
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            line = self.line + self.buf.count("\n", self.pos) + exc.object[: exc.start].count(b"\n")
            byte = exc.object[exc.start]
            raise InputError(f"{self.path}:{line}: not UTF-8 text (byte 0x{byte:02x})", hint=UTF8_HINT) from exc
        self.buf, self.pos = self.buf[self.pos :] + text, 0
        self.eof = not data
        return True

    def _advance(self, to: int) -> None:
        self.line += self.buf.count("\n", self.pos, to)
        self.pos = to

    def _peek(self) -> str | None:
        """The next non-blank character (None at end of file)."""
        while True:
            self._advance(_WS.match(self.buf, self.pos).end())  # type: ignore[union-attr]
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                return None

    def _error(self, message: str, at: int | None = None) -> InputError:
        line = self.line + (self.buf.count("\n", self.pos, at) if at is not None else 0)
        return InputError(f"{self.path}:{line}: invalid JSON ({message})")

    def _decode(self) -> Any:
        while True:
            try:
                value, end = json.JSONDecoder().raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                # A cut element fails near the buffer's end (or inside a string that runs to it): read on.
                cut = exc.pos >= len(self.buf) - 16 or exc.msg.startswith("Unterminated string")
                if cut and self._more():
                    self.chunk = min(self.chunk * 2, 1 << 28)
                    continue
                raise self._error(exc.msg.removesuffix(" at"), exc.pos) from exc
            if end == len(self.buf) and self._more():  # a number may go on in the next chunk
                continue
            self.chunk = self.base_chunk
            self._advance(end)
            return value

    def elements(self) -> Iterator[tuple[int, Any]]:
        """(line, value) of each element, in order."""
        first = self._peek()
        if first is None:
            return
        if first != "[":
            raise self._error(f"expected a JSON array, found {first!r}")
        self._advance(self.pos + 1)
        index = 0
        while True:
            c = self._peek()
            if c == "]":
                return
            if index:
                if c != ",":
                    raise self._error("expected ',' or ']' after an element" if c else "the array is not closed")
                self._advance(self.pos + 1)
                c = self._peek()
            if c is None:
                raise self._error("the array is not closed")
            line = self.line
            yield line, self._decode()
            index += 1
