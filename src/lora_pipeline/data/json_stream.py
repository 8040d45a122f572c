"""The rows of a .json file, decoded one at a time: a JSON array of rows (or `{"data": [...]}`) larger than memory
is read in bounded memory, like every other file type. The file is one document: a syntax error anywhere, or bytes
that are not UTF-8, is one DataError naming the file and line (rows before it were read, but the stage writes
nothing it has not finished).
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from typing import BinaryIO

from lora_pipeline.errors import DataError

FIELD = "dataset.data_uri"
CHUNK = 1 << 20  # bytes read at a time; a row longer than this is read in growing steps
_WS = " \t\n\r"
_NUMBER = "0123456789.eE+-"
_DECODER = json.JSONDecoder()  # as json.loads: NaN and Infinity read as floats


class JsonLines(Exception):
    """The .json file holds one object and then more: JSON Lines, to be read line by line."""


class JsonStream:
    """A cursor over one JSON document in a file: the text not yet consumed, and the line it starts on."""

    def __init__(self, fh: BinaryIO, name: str) -> None:
        self.fh, self.name = fh, name
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf, self.pos, self.line, self.eof = "", 0, 1, False
        self._more(CHUNK)
        self.buf = self.buf.removeprefix("\ufeff")

    def rows(self) -> Iterator[object]:
        """The rows of the document: an array's items, or the items of an object's "data" array."""
        first = self.peek()
        if first == "[":
            yield from self._array()
        elif first == "{":
            found = yield from self._data_object()
            if self.peek() and not found:
                raise JsonLines
            if not found:
                raise DataError(f'{self.name}: expected a list of rows or {{"data": [...]}}', field=FIELD)
        else:
            self._value()  # a scalar: parsed, so that a syntax error is reported as one
            raise DataError(f'{self.name}: expected a list of rows or {{"data": [...]}}', field=FIELD)
        if self.peek():
            self._error("Extra data")

    def peek(self) -> str:
        """The next character that is not whitespace ("" at the end), not consumed."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.buf) or self.eof:
                return self.buf[self.pos : self.pos + 1]
            self._more(CHUNK)

    def _take(self, chars: str, expected: str) -> str:
        c = self.peek()
        if not c or c not in chars:
            self._error(f"Expecting {expected}")
        self.pos += 1
        return c

    def _array(self) -> Iterator[object]:
        self._take("[", "'['")
        if self.peek() == "]":
            self.pos += 1
            return
        while True:
            yield self._value()
            if self._take(",]", "',' delimiter") == "]":
                return

    def _data_object(self) -> Iterator[object]:
        """Rows of the "data" array of a top-level object (the other members are parsed and dropped); returns
        whether there was one."""
        found = False
        self._take("{", "'{'")
        if self.peek() == "}":
            self.pos += 1
            return found
        while True:
            if self.peek() != '"':
                self._error("Expecting property name enclosed in double quotes")
            key = self._value()
            self._take(":", "':' delimiter")
            if key == "data" and self.peek() == "[" and not found:
                found = True
                yield from self._array()
            elif key == "data":
                self._value()
                raise DataError(f'{self.name}: expected a list of rows or {{"data": [...]}}', field=FIELD)
            else:
                self._value()
            if self._take(",}", "',' delimiter") == "}":
                return found

    def _value(self) -> object:
        """The next complete JSON value. A value cut by the end of the text read so far is read again with more:
        a number that ends the buffer may go on, and an error at its end may be the data running out."""
        self.peek()
        while True:
            try:
                value, end = _DECODER.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as exc:
                cut = exc.pos >= len(self.buf) - 8 or exc.msg.startswith("Unterminated string")
                if self.eof or not cut:
                    self.pos = exc.pos
                    self._error(exc.msg)
                self._more(max(CHUNK, len(self.buf) - self.pos))
                continue
            except ValueError:
                raise DataError(
                    f"{self.name}: a number too long to read (more than 4300 digits)", field=FIELD
                ) from None
            except RecursionError:
                raise DataError(f"{self.name}: nested too deep to read", field=FIELD) from None
            # "0" of "0.5", "1" of "1e3" cut by the read: not yet (a look at the next characters, not the buffer)
            if self.eof or self.buf[end : end + 32].strip(_NUMBER) or end + 32 < len(self.buf):
                self.pos = end
                return value
            self._more(CHUNK)

    def _more(self, size: int) -> None:
        """Read `size` more bytes into the buffer, dropping the consumed text (counting its lines)."""
        data = self.fh.read(size)
        self.eof = not data
        pending = len(self.decoder.getstate()[0])  # bytes of a character cut by the last read, before `data`
        try:
            text = self.decoder.decode(data, final=self.eof)
        except UnicodeDecodeError as exc:
            line = self.line + self.buf.count("\n") + data[: max(exc.start - pending, 0)].count(b"\n")
            raise DataError(f"{self.name} is not valid UTF-8 (line {line})", field=FIELD) from None
        self.line += self.buf.count("\n", 0, self.pos)
        self.buf, self.pos = self.buf[self.pos :] + text, 0

    def _error(self, msg: str) -> None:
        line = self.line + self.buf.count("\n", 0, self.pos)
        raise DataError(f"{self.name} is not valid JSON: {msg} (line {line})", field=FIELD)
