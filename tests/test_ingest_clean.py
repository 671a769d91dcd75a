"""Unit tests of ingest's cleaning rules, streaming reader, document cutting, split and contamination check."""

from __future__ import annotations

import io
import random
from collections import Counter

import pytest

from lmcore.data.clean import DocumentBuilder, clean_text, decode_repair, find_cut, split_incomplete_utf8
from lmcore.data.sources import iter_text_blocks
from lmcore.data.split import NgramOverlap, content_digest, content_id, is_val


def build(text: str, max_chars: int = 1_000_000) -> list[str]:
    builder = DocumentBuilder(max_chars)
    return [*builder.feed(text), *builder.finish()]


def stream(data: bytes, block: int, max_chars: int = 1_000_000) -> tuple[list[str], Counter]:
    counts: Counter = Counter()
    builder = DocumentBuilder(max_chars)
    docs = []
    for piece in iter_text_blocks(io.BytesIO(data), counts, block=block):
        docs.extend(builder.feed(piece))
    docs.extend(builder.finish())
    return docs, counts


# --- decoding ------------------------------------------------------------------------------------------------


def test_utf8_with_stray_cp1252_bytes_keeps_the_utf8_and_repairs_the_rest():
    raw = "naïve café ".encode() + b"\x93quoted\x94 \x80"
    text, repaired = decode_repair(raw)
    assert text == "naïve café “quoted” €"
    assert repaired == 3


def test_bytes_cp1252_leaves_undefined_fall_back_to_latin1_then_count_as_control_characters():
    text, repaired = decode_repair(b"a\x81b\xe9")
    assert (text, repaired) == ("a\x81bé", 2)
    assert clean_text(text) == "abé"


def test_valid_utf8_is_untouched():
    assert decode_repair("żółw 🐢".encode()) == ("żółw 🐢", 0)


@pytest.mark.parametrize(
    ("raw", "head", "tail"),
    [
        (b"ab\xc3", b"ab", b"\xc3"),  # 2-byte sequence cut after its lead byte
        (b"ab\xc3\xa9", b"ab\xc3\xa9", b""),  # complete
        (b"a\xf0\x9f\x90", b"a", b"\xf0\x9f\x90"),  # 4-byte emoji cut after 3 bytes
        (b"a\x80", b"a\x80", b""),  # a stray continuation byte is not held back (it is repaired)
    ],
)
def test_split_incomplete_utf8(raw, head, tail):
    assert split_incomplete_utf8(raw) == (head, tail)


def test_repaired_lines_are_counted_once_even_when_a_long_line_spans_blocks():
    line = b"caf\xe9 " * 40  # one 200-byte line, a cp1252 byte in every 5 bytes
    data = b"clean line\n" + line + b"\n" + b"ok \x92 too\n"
    docs, counts = stream(data, block=16)
    assert counts["bytes_repaired"] == 41
    assert counts["lines_repaired"] == 2
    assert "café café" in docs[0] and "ok ’ too" in docs[0]


# --- normalisation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("cafe\u0301", "café"),  # NFC
        ("a\x00b\x07c\td\x1be\x7f", "abc\tde"),  # control characters go, TAB stays
        ("\ufeffbom", "bom"),
        ("a\r\nb\rc\u2028d\x0ce", "a\nb\nc\nd\ne"),  # every line break becomes LF
        ("a    b  c", "a b c"),  # runs of spaces
        ("a  \nb\t \nc", "a\nb\nc"),  # trailing spaces and tabs
        ("a\n\n\n\n\nb\n\n\nc", "a\n\nb\n\nc"),  # 3+ newlines become 2
        ("a\n \n\t\n\nb", "a\n\nb"),  # lines of blanks are blank lines
        ("\n\n   text  \n\n", "text"),  # leading and trailing blank space
        ("x\ud800y", "x\ufffdy"),  # a lone surrogate (from a JSON escape)
    ],
)
def test_cleaning_rules(raw, clean):
    assert build(raw) == [clean]
    assert clean_text(raw) == clean


def test_a_document_of_only_blanks_and_controls_is_empty():
    assert build(" \n\t\x00\x01 \r\n") == []
    assert clean_text(" \x00 ") == ""


def test_streaming_in_small_blocks_equals_cleaning_the_whole_text():
    rng = random.Random(7)
    tokens = ["word", "naïve", "e\u0301", "  ", " ", "\t", "\r\n", "\n", "\n\n\n", "\x00", "“q”", "end.", "🐢"]
    one_line = [t for t in tokens if "\n" not in t]
    text = "".join(rng.choice(tokens) + rng.choice(["", " "]) for _ in range(10_000))
    text += "".join(rng.choice(one_line) + rng.choice(["", " "]) for _ in range(10_000))  # a ~40 kB line
    raw = text.encode("utf-8").replace(b"\xe2\x80\x9c", b"\x93")  # some left quotes as stray cp1252 bytes
    whole, _ = decode_repair(raw)
    expected = build(whole)
    for block in (64, 1000, 1 << 20):
        docs, counts = stream(raw, block)
        assert docs == expected, block
        assert counts["bytes_repaired"] == raw.count(b"\x93")


# --- cutting -------------------------------------------------------------------------------------------------


def words(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(2, 9))) for _ in range(n)]


def check_pieces(pieces: list[str], text: str, limit: int) -> None:
    assert all(len(p) <= limit for p in pieces)
    assert " ".join(pieces).split() == text.split()  # nothing lost, no word cut


def test_cut_prefers_paragraph_breaks():
    paragraphs = [" ".join(words(40, seed)) for seed in range(12)]
    text = "\n\n".join(paragraphs)
    pieces = build(text, max_chars=1000)
    check_pieces(pieces, text, 1000)
    assert len(pieces) > 1
    assert all(set(p.split("\n\n")) <= set(paragraphs) for p in pieces)


def test_cut_falls_back_to_lines_then_sentences_then_spaces():
    lines = "\n".join(" ".join(words(12, seed)) for seed in range(60))
    pieces = build(lines, max_chars=1000)
    check_pieces(pieces, lines, 1000)
    assert all(piece in lines.split("\n") or "\n" in piece for piece in pieces)
    assert all(lines.startswith(pieces[0]) and f"\n{p}" in lines for p in pieces[1:])

    sentences = " ".join(" ".join(words(8, seed)) + "." for seed in range(200))
    pieces = build(sentences, max_chars=1000)
    check_pieces(pieces, sentences, 1000)
    assert all(p.endswith(".") for p in pieces)

    plain = " ".join(words(2000))
    pieces = build(plain, max_chars=1000)
    check_pieces(pieces, plain, 1000)
    assert all(len(p) >= 500 for p in pieces[:-1])


def test_cut_without_any_boundary_is_exactly_at_the_limit():
    text = "x" * 2500
    assert build(text, max_chars=1000) == ["x" * 1000, "x" * 1000, "x" * 500]
    assert find_cut("y" * 1200, 1000) == (1000, 0)


def test_cut_ignores_boundaries_in_the_first_half_of_the_window():
    text = "short.\n\n" + "z" * 3000
    pieces = build(text, max_chars=1000)
    assert pieces[0] == "short.\n\n" + "z" * 992


# --- split and contamination ---------------------------------------------------------------------------------


def test_split_depends_only_on_content_and_salt():
    docs = [f"document number {i}" for i in range(10_000)]
    digests = [content_digest(d) for d in docs]
    val = [is_val(d, "salt", 0.1) for d in digests]
    assert 900 < sum(val) < 1100
    assert val == [is_val(content_digest(d), "salt", 0.1) for d in docs]
    other = [is_val(d, "other salt", 0.1) for d in digests]
    assert other != val and 900 < sum(other) < 1100
    assert content_id(digests[0]) == digests[0][:8].hex() and len(content_id(digests[0])) == 16


def test_contamination_is_the_share_of_val_ngrams_seen_in_train():
    overlap = NgramOverlap(3)
    overlap.add("The quick brown fox jumps over the lazy dog", "train")
    overlap.add("the QUICK brown, fox!", "val")  # 2 n-grams, both in train (case and punctuation ignored)
    overlap.add("a wholly new sentence here", "val")  # 3 new n-grams
    overlap.add("too short", "val")  # no 3-gram
    assert overlap.result() == {"ngram": 3, "val_ngrams": 5, "shared_with_train": 2, "fraction": 0.4}
    assert NgramOverlap(13).result()["fraction"] == 0.0
