"""Hostile values for the property tests: what a broken or hostile peer, file or stream may hold.

Shared by tests/unit/test_property_*.py (and its own checks at the end). Every strategy here is bounded (sizes, nesting) so that
one example costs milliseconds, and "huge" means past the limits the code under test documents
(int() digit limits, header sizes), not past what the test machine holds.
"""

from __future__ import annotations

import re
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

def budget(examples: int, deadline_ms: int = 2000) -> settings:
    """Settings for every property: a deadline per example (a hang fails the test), derandomized so a
    run repeats, and `examples` few enough that each file runs in seconds."""
    return settings(max_examples=examples, deadline=deadline_ms, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


#: Text with what breaks parsers: NULs, control characters, surrogate-free astral characters, newlines.
nasty_text = st.one_of(
    st.text(max_size=40),
    st.text(alphabet=st.sampled_from("\x00\x01\x1b\n\r\t\u2028\ufeff\U0001f600 -:{}[]&*!|>'\"%@`#,?"),
            max_size=40),
    st.sampled_from(["", " ", "-", "--", "---", "~", "\x00", "²", "١٢٣", "1e999", "NaN", "-Infinity",
                     "0x" + "f" * 20, "9" * 5000, "\u202e", "../../etc/passwd", "/abs", "a" * 5000]),
)

#: Numbers at and past every edge: bools (an int subclass), huge ints, NaN, infinities, negatives.
nasty_numbers = st.one_of(
    st.booleans(),
    st.integers(),
    st.integers(min_value=-(10 ** 30), max_value=10 ** 30),
    st.sampled_from([0, -1, 2 ** 63, -(2 ** 63), 10 ** 400]),  # digits past 4300 come as text
    st.floats(allow_nan=True, allow_infinity=True),
)

nasty_scalars = st.one_of(st.none(), nasty_numbers, nasty_text)


def nasty_values(max_leaves: int = 10) -> st.SearchStrategy[Any]:
    """JSON/YAML-shaped values of any type in any place: scalars, lists and mappings of them."""
    return st.recursive(
        nasty_scalars,
        lambda inner: st.one_of(st.lists(inner, max_size=4),
                                st.dictionaries(st.one_of(nasty_text, st.integers()), inner, max_size=4)),
        max_leaves=max_leaves,
    )


def swap_types(value: Any) -> st.SearchStrategy[Any]:
    """Values of any type but `value`'s own, for "every field's type swapped"."""
    return nasty_values(6).filter(lambda v: type(v) is not type(value))


def mutate_bytes(data: bytes) -> st.SearchStrategy[bytes]:
    """`data` cut, with bytes inserted, replaced or deleted at arbitrary places."""

    @st.composite
    def mutated(draw: st.DrawFn) -> bytes:
        out = bytearray(data)
        for _ in range(draw(st.integers(min_value=1, max_value=4))):
            op = draw(st.sampled_from(["cut", "insert", "replace", "delete"]))
            at = draw(st.integers(min_value=0, max_value=len(out)))
            if op == "cut":
                del out[at:]
            elif op == "insert":
                out[at:at] = draw(st.binary(min_size=1, max_size=8) | nasty_text.map(str.encode))
            elif op == "replace" and at < len(out):
                out[at] = draw(st.integers(min_value=0, max_value=255))
            elif op == "delete":
                del out[at:at + draw(st.integers(min_value=1, max_value=8))]
        return bytes(out)

    return mutated()


#: A reason names something: not empty, and not a bare Python repr of an exception.
_BARE = re.compile(r"^\w+Error\b")


def assert_clear_reason(text: str) -> None:
    """The error text says why: non-empty and not a bare `SomethingError...` from deep inside."""
    assert text.strip(), "the error gives no reason"
    assert not _BARE.match(text), f"the error is a bare exception text: {text[:200]!r}"


# ---------------------------------------------------------------- checks of the strategies above


def test_a_bare_exception_text_is_not_a_clear_reason() -> None:
    assert_clear_reason("tasks/t.md: key 'timeout': expected a duration like 30s, got 'x'")
    for bad in ("", "  ", "ValueError: invalid literal for int()", "RecursionError maximum recursion depth"):
        try:
            assert_clear_reason(bad)
        except AssertionError:
            continue
        raise AssertionError(f"{bad!r} passed as a clear reason")

