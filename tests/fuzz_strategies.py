"""Hypothesis settings and msgpack value strategies shared by the decoder fuzz tests (wire, GR00T, websocket)."""

from __future__ import annotations

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

msgpack_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.binary(max_size=40),
)


def msgpack_values(binary_keys: bool = False) -> st.SearchStrategy:
    """Any msgpack-encodable value, nested; map keys are text (and bytes too with ``binary_keys``)."""
    keys = st.one_of(st.text(max_size=8), st.binary(max_size=8)) if binary_keys else st.text(max_size=8)
    return st.recursive(
        msgpack_leaves,
        lambda children: st.one_of(st.lists(children, max_size=5), st.dictionaries(keys, children, max_size=5)),
        max_leaves=30,
    )
