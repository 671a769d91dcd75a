"""Text cleaning for ingest: repair bytes that are not UTF-8, normalise text, cut long documents.

Everything works on bounded blocks of text so a 50 MB single-line file streams through in ~1 MiB pieces. The
rules, in order:

- Decoding: UTF-8; each byte sequence that is not valid UTF-8 is decoded as cp1252 byte by byte (latin-1 for the
  five bytes cp1252 leaves undefined) and counted. Repairing per bad sequence rather than per line keeps the valid
  UTF-8 characters of a line that also holds a stray cp1252 byte.
- Text: lone surrogates become U+FFFD; CR LF, CR, VT, FF, U+2028 and U+2029 become LF; other control characters
  (and the BOM) are removed, keeping LF and TAB; Unicode NFC; runs of spaces become one space; spaces and tabs at
  the end of a line are removed; 3+ newlines become 2 (one blank line); leading and trailing blank space of a
  document is removed.
- Cutting (`DocumentBuilder`): a document longer than `max_chars` is cut before the limit, at the last paragraph
  break (blank line) in the second half of the window, else the last line break, else the last sentence end
  (`.`, `!` or `?`, optionally followed by closing quotes or brackets, then a space), else the last space or tab,
  else exactly at the limit. Every piece is therefore at most `max_chars` long and at least half of it (except
  the last piece).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterator

_SURROGATE = re.compile(r"[\ud800-\udfff]")
_NEWLINE_CHARS = "\r\x0b\x0c\u2028\u2029"
_NEWLINE_LIKE = re.compile(r"\r\n?|[\x0b\x0c\u2028\u2029]")
_CONTROL = re.compile(r"[\x00-\x08\x0e-\x1f\x7f-\x9f\ufeff]")  # TAB (09) and LF (0a) stay; 0b-0d are newlines
_SPACES = re.compile(r" {2,}")
_TRAILING = re.compile(r"[ \t]+\n")
_BLANK_LINES = re.compile(r"\n{3,}")
_BLANK_OR_CONTROL = re.compile(r"[ \t\r\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff]")
_ALL_BLANK = re.compile(r"[ \t\r\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff]*")
_SENTENCE_END = re.compile(r"[.!?][\"'”’)\]]* ")


# --- decoding ------------------------------------------------------------------------------------------------


def _legacy_byte(b: int) -> str:
    try:
        return bytes([b]).decode("cp1252")
    except UnicodeDecodeError:
        return bytes([b]).decode("latin-1")


def decode_repair(raw: bytes) -> tuple[str, int]:
    """Decode UTF-8, repairing invalid sequences as cp1252 (latin-1 last). Returns (text, bytes repaired)."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        pass
    parts: list[str] = []
    repaired = 0
    decoder_pos = 0
    view = memoryview(raw)
    while decoder_pos < len(raw):
        try:
            parts.append(str(view[decoder_pos:], "utf-8"))
            break
        except UnicodeDecodeError as err:
            parts.append(str(view[decoder_pos : decoder_pos + err.start], "utf-8"))
            bad = raw[decoder_pos + err.start : decoder_pos + err.end]
            parts.append("".join(_legacy_byte(b) for b in bad))
            repaired += len(bad)
            decoder_pos += err.end
    return "".join(parts), repaired


def split_incomplete_utf8(raw: bytes) -> tuple[bytes, bytes]:
    """Split off a UTF-8 sequence cut short at the end of `raw` (at most 3 bytes), to be decoded with what follows."""
    for back in range(1, min(4, len(raw)) + 1):
        byte = raw[-back]
        if byte & 0xC0 == 0x80:  # continuation byte: keep looking for the lead byte
            continue
        if byte >= 0xC0:
            need = 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            if need > back:
                return raw[:-back], raw[-back:]
        break
    return raw, b""


def bad_utf8_lines(raw: bytes) -> int:
    """How many LF-separated lines of `raw` are not valid UTF-8 (only called once a repair happened)."""
    count = 0
    for line in raw.split(b"\n"):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError:
            count += 1
    return count


# --- normalisation -------------------------------------------------------------------------------------------


def clean_block(text: str) -> str:
    """Normalise a block that starts and ends at a safe boundary (line end or before whitespace).

    Each rewrite runs only when a cheap scan finds something to rewrite: most text needs none of them.
    """
    ascii_only = text.isascii()
    if not ascii_only and _SURROGATE.search(text):
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if any(c in text for c in _NEWLINE_CHARS):
        text = _NEWLINE_LIKE.sub("\n", text)
    if _CONTROL.search(text):
        text = _CONTROL.sub("", text)
    if not ascii_only:
        text = unicodedata.normalize("NFC", text)
    if "  " in text:
        text = _SPACES.sub(" ", text)
    if " \n" in text or "\t\n" in text:
        text = _TRAILING.sub("\n", text)
    return text


def clean_text(text: str) -> str:
    """Clean one short string completely (a message, a label, a classification text); no cutting."""
    text = _BLANK_LINES.sub("\n\n", clean_block(text + "\n"))
    return text.strip()


def carry_split(text: str) -> tuple[str, str]:
    """Split a partial line into a piece to clean now and a tail to prepend to what follows.

    The cut goes before the last run of whitespace (with the control characters next to it, which vanish in
    cleaning), so no normalisation rule spans it. A text without such a run keeps its last character and its
    combining marks for later (NFC stays exact); a text of nothing but blanks is all tail.
    """
    at = max(text.rfind(" "), text.rfind("\t"), text.rfind("\r"))
    while at > 0 and _BLANK_OR_CONTROL.match(text, at - 1):
        at -= 1
    if at > 0:
        return text[:at], text[at:]
    if _ALL_BLANK.fullmatch(text):
        return "", text
    at = len(text) - 1
    while at > 0 and unicodedata.combining(text[at]):
        at -= 1
    return text[:at], text[at:]


# --- cutting -------------------------------------------------------------------------------------------------


def find_cut(text: str, limit: int) -> tuple[int, int]:
    """Where to cut `text` (longer than `limit`): (end of the first piece, separator length to skip)."""
    low = limit // 2
    for sep in ("\n\n", "\n"):
        at = text.rfind(sep, low, limit + len(sep))
        if at >= low:
            return at, len(sep)
    last = None
    for last in _SENTENCE_END.finditer(text, low, limit + 1):  # noqa: B007 - only the last match counts
        pass
    if last is not None:
        return last.end() - 1, 1
    at = max(text.rfind(" ", low, limit + 1), text.rfind("\t", low, limit + 1))
    if at >= low:
        return at, 1
    return limit, 0


class DocumentBuilder:
    """Streams cleaned text into documents of at most `max_chars`, holding about one document plus one block.

    Feed blocks that end at a line end or before whitespace (see `carry_split`); `feed` and `finish` yield the
    finished documents. `pieces` counts the documents yielded, so pieces > 1 means the input was cut.
    """

    def __init__(self, max_chars: int) -> None:
        self.max_chars = max_chars
        self.parts: list[str] = []
        self.size = 0
        self.pending_newlines = 0
        self.started = False
        self.pieces = 0

    def feed(self, block: str) -> Iterator[str]:
        text = clean_block(block)
        body = text.lstrip("\n")
        self.pending_newlines += len(text) - len(body)
        if not body:
            return
        core = body.rstrip("\n")
        if self.started and self.pending_newlines:
            self._append("\n" * min(self.pending_newlines, 2))
        self._append(_BLANK_LINES.sub("\n\n", core) if "\n\n\n" in core else core)
        self.started = True
        self.pending_newlines = len(body) - len(core)
        if self.size > self.max_chars:
            yield from self._cut()

    def finish(self) -> Iterator[str]:
        piece = "".join(self.parts).strip()
        self.parts, self.size = [], 0
        if piece:
            self.pieces += 1
            yield piece

    def _append(self, text: str) -> None:
        self.parts.append(text)
        self.size += len(text)

    def _cut(self) -> Iterator[str]:
        text = "".join(self.parts)
        start = 0
        while len(text) - start > self.max_chars:
            window = text[start : start + self.max_chars + 2]
            end, skip = find_cut(window, self.max_chars)
            piece = window[:end].strip()
            if piece:
                self.pieces += 1
                yield piece
            start += end + skip
        rest = text[start:]
        self.parts, self.size = [rest], len(rest)
