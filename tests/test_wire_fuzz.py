"""Property-based fuzzing of the wire decoder and request validation (hypothesis).

The decoder must never raise anything but WireError, never allocate what a message merely
declares, and accept every well-formed request.
"""

from __future__ import annotations

import struct

import msgpack
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from client import wire

FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

msgpack_leaves = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20), st.binary(max_size=40),
)
msgpack_values = st.recursive(
    msgpack_leaves,
    lambda children: st.one_of(st.lists(children, max_size=5),
                               st.dictionaries(st.text(max_size=8), children, max_size=5)),
    max_leaves=30,
)


def _decode_and_parse(payload: bytes) -> None:
    try:
        msg = wire.unpackb(payload)
        wire.parse_request(msg)
    except wire.WireError as exc:
        assert exc.code in wire.ERROR_CODES


@FUZZ
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_crash(payload: bytes) -> None:
    _decode_and_parse(payload)


@FUZZ
@given(msgpack_values)
def test_arbitrary_msgpack_structures_never_crash(value) -> None:
    _decode_and_parse(msgpack.packb(value, use_bin_type=True))


@FUZZ
@given(msgpack_values, st.integers(min_value=1, max_value=200))
def test_truncated_messages_never_crash(value, cut: int) -> None:
    payload = msgpack.packb({"v": 1, "type": "infer", "id": 1, "obs": {"x": value}}, use_bin_type=True)
    _decode_and_parse(payload[: max(0, len(payload) - cut)])


@FUZZ
@given(
    code=st.integers(min_value=0, max_value=255),
    ndim=st.integers(min_value=0, max_value=255),
    shape=st.lists(st.integers(min_value=0, max_value=2**40), max_size=10),
    body=st.binary(max_size=256),
)
def test_ext_with_lying_shapes_and_dtypes(code: int, ndim: int, shape: list[int], body: bytes) -> None:
    header = struct.pack("<BB", code, ndim) + struct.pack(f"<{len(shape)}Q", *shape)
    payload = msgpack.packb({"v": 1, "type": "infer", "id": 1,
                             "obs": {"state": msgpack.ExtType(wire.NDARRAY_EXT_CODE, header + body)}})
    try:
        msg = wire.unpackb(payload)
    except wire.WireError:
        return
    # Accepted only if the declaration was honest.
    arr = msg["obs"]["state"]
    assert arr.nbytes == len(body) and arr.ndim == ndim == len(shape)


@FUZZ
@given(st.integers(min_value=1, max_value=64), st.sampled_from([np.nan, np.inf, -np.inf]))
def test_non_finite_state_refused(n: int, bad: float) -> None:
    state = np.zeros(n, np.float32)
    state[n // 2] = bad
    payload = wire.packb(wire.make_request("infer", 1, {"state": state}))
    try:
        wire.parse_request(wire.unpackb(payload))
    except wire.WireError as exc:
        assert exc.code == wire.ERR_BAD_REQUEST
    else:
        raise AssertionError("non-finite state accepted")


@FUZZ
@given(
    h=st.integers(min_value=1, max_value=64), w=st.integers(min_value=1, max_value=64),
    state=st.lists(st.floats(min_value=-1e6, max_value=1e6, width=32), min_size=1, max_size=16),
    text=st.text(max_size=100), req_id=st.one_of(st.integers(min_value=0, max_value=2**62), st.text(max_size=50)),
)
def test_every_well_formed_request_accepted(h: int, w: int, state: list[float], text: str, req_id) -> None:
    obs = {"image": np.zeros((h, w, 3), np.uint8), "state": np.asarray(state, np.float32), "instruction": text}
    req = wire.parse_request(wire.unpackb(wire.packb(wire.make_request("infer", req_id, obs))))
    assert req.id == req_id and req.obs["image"].shape == (h, w, 3)
    np.testing.assert_array_equal(req.obs["state"], np.asarray(state, np.float32))
