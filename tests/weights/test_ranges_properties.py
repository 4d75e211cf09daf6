"""Property-based tests of Range parsing: any header, any size, only documented outcomes."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weights.ranges import MAX_HEADER, ByteRange, Unsatisfiable, parse_range

FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
sizes = st.integers(min_value=0, max_value=2**63)
digits = st.text("0123456789", max_size=25)

# Headers close to the grammar find the edges better than arbitrary text alone.
near_grammar = st.one_of(
    st.builds(lambda a, b: f"bytes={a}-{b}", digits, digits),
    st.builds(lambda a, b, c: f"bytes={a}-{b},{c}", digits, digits, digits),
    st.builds(
        lambda u, a, b: f"{u}={a}-{b}",
        st.sampled_from(["Bytes", "items", " bytes"]),
        digits,
        digits,
    ),
    st.builds(lambda a: f"bytes={a}", st.text(max_size=40)),
)
headers = st.one_of(st.none(), st.text(max_size=MAX_HEADER + 20), near_grammar)


def check(header: str | None, size: int) -> ByteRange | None:
    try:
        result = parse_range(header, size)
    except Unsatisfiable:
        return None  # documented: the single range lies outside the file
    if result is None:
        return None  # documented: serve the whole file
    assert isinstance(result, ByteRange)
    assert 0 <= result.start <= result.end < size, (header, size, result)
    assert result.size == size
    assert 1 <= result.length <= size
    assert result.content_range == f"bytes {result.start}-{result.end}/{size}"
    return result


@FAST
@given(headers, sizes)
def test_parse_never_raises_anything_else_and_stays_in_the_file(header, size):
    check(header, size)


@FAST
@given(near_grammar, st.integers(min_value=1, max_value=10**6))
def test_accepted_ranges_lie_within_small_files(header, size):
    check(header, size)


@FAST
@given(
    st.integers(min_value=0, max_value=10**9),
    st.integers(min_value=0, max_value=10**9),
    st.integers(min_value=1, max_value=10**9),
)
def test_well_formed_ranges_are_honoured_or_refused_as_documented(first, last, size):
    header = f"bytes={first}-{last}"
    if last < first:
        assert parse_range(header, size) is None
    elif first >= size:
        try:
            parse_range(header, size)
        except Unsatisfiable:
            pass
        else:
            raise AssertionError("a range starting past the end must be unsatisfiable")
    else:
        result = parse_range(header, size)
        assert (result.start, result.end) == (first, min(last, size - 1))


@FAST
@given(st.integers(min_value=1, max_value=10**12), st.integers(min_value=1, max_value=10**12))
def test_suffix_ranges_end_at_the_last_byte(suffix, size):
    result = parse_range(f"bytes=-{suffix}", size)
    assert result.end == size - 1
    assert result.length == min(suffix, size)


@FAST
@given(st.text(min_size=MAX_HEADER + 1, max_size=MAX_HEADER + 200), sizes)
def test_oversized_headers_are_ignored(header, size):
    assert parse_range(header, size) is None
