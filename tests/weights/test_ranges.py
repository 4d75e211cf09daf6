"""Range header parsing (RFC 9110 §14): one range honoured, everything odd served whole."""

from __future__ import annotations

import pytest

from weights.ranges import ByteRange, Unsatisfiable, etag_matches, if_range_allows, parse_range

SIZE = 1000


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-99", (0, 99)),
        ("bytes=100-", (100, 999)),
        ("bytes=-100", (900, 999)),
        ("bytes=-5000", (0, 999)),  # a suffix longer than the file is the whole file
        ("bytes=990-5000", (990, 999)),  # the end is clamped
        ("bytes=999-999", (999, 999)),
    ],
)
def test_single_ranges(header, expected):
    byte_range = parse_range(header, SIZE)
    assert (byte_range.start, byte_range.end) == expected
    assert byte_range.length == expected[1] - expected[0] + 1
    assert byte_range.content_range == f"bytes {expected[0]}-{expected[1]}/{SIZE}"


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "bytes",
        "bytes=",
        "bytes=-",
        "bytes=abc-def",
        "bytes=10-5",  # last before first: invalid, so ignored
        "bytes=1.5-2",
        "bytes=1_0-20",  # int() would accept this; the grammar does not
        "bytes=\u0661-\u0662",  # non-ASCII digits
        "items=0-10",  # another unit
        "0-10",
        "bytes=0-10,20-30",  # several ranges: the whole file (documented choice)
        "bytes=0-10,-5",
        "bytes=0-" + "9" * 2000,  # absurdly long
        # Legal but unusual spellings are served whole too, so nginx and S3, which may
        # read them differently, never send more than what was charged.
        "Bytes=5-9",
        "bytes = 5-9",
        " bytes=5-9",
        "bytes=5-9 ",
        "bytes=0-99,",
        "bytes=0-99\n",
    ],
)
def test_malformed_or_multiple_ranges_mean_the_whole_file(header):
    assert parse_range(header, SIZE) is None


@pytest.mark.parametrize(
    "header", ["bytes=1000-", "bytes=1000-2000", "bytes=5000-6000", "bytes=-0"]
)
def test_unsatisfiable(header):
    with pytest.raises(Unsatisfiable):
        parse_range(header, SIZE)


def test_empty_file_has_no_satisfiable_range():
    for header in ("bytes=0-", "bytes=-1", "bytes=0-0"):
        with pytest.raises(Unsatisfiable):
            parse_range(header, 0)
    assert parse_range("bytes=oops", 0) is None


def test_byte_range_is_a_value():
    assert parse_range("bytes=0-0", 1) == ByteRange(0, 0, 1)


def test_if_range_needs_a_strong_exact_match():
    etag = '"abc"'
    assert if_range_allows(None, etag)
    assert if_range_allows('"abc"', etag)
    assert if_range_allows(' "abc" ', etag)
    assert not if_range_allows('"abd"', etag)
    assert not if_range_allows('W/"abc"', etag)  # weak validators never match If-Range
    assert not if_range_allows("Wed, 21 Oct 2015 07:28:00 GMT", etag)  # we send no Last-Modified
    assert not if_range_allows("", etag)


def test_if_none_match_is_weak():
    etag = '"abc"'
    assert etag_matches('"abc"', etag)
    assert etag_matches('W/"abc"', etag)
    assert etag_matches('"x", "abc"', etag)
    assert etag_matches("*", etag)
    assert not etag_matches('"x"', etag)
    assert not etag_matches(None, etag)
    assert not etag_matches("", etag)
