"""Property-based fuzzing of the wire decoder and request validation (hypothesis).

The decoder must never raise anything but WireError, never allocate what a message merely
declares, and accept every well-formed request.
"""

from __future__ import annotations

import struct

import msgpack
import numpy as np
from fuzz_strategies import FUZZ
from fuzz_strategies import msgpack_values as msgpack_values_of
from hypothesis import given
from hypothesis import strategies as st

from client import wire

msgpack_values = msgpack_values_of(binary_keys=False)


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


# ----------------------------------------------------------------------------------------------
# The Isaac-GR00T protocol (server/gr00t_protocol.py): same rules, its own codec.


def _gr00t_decode_and_map(payload: bytes) -> None:
    """What the server does with a GR00T message: decode, validate, map to the policy's keys."""
    from models.gr00t.data_config import LiberoDataConfig
    from server import gr00t_protocol as g

    try:
        request = g.parse_request(wire.unpackb(payload), wire.DEFAULT_LIMITS)
        if request.endpoint == "get_action":
            obs, _ = g.flat_observation(request.data)
            wire.validate_observation(g.to_libero_policy(obs, LiberoDataConfig()), wire.DEFAULT_LIMITS)
            g.to_gr00t_policy(obs)
    except g.Gr00tError as exc:
        assert exc.code in g.ERROR_CODES
    except wire.WireError as exc:
        assert exc.code in wire.ERROR_CODES


def _npy_map(as_npy) -> dict:
    return {"__ndarray_class__": True, "as_npy": as_npy}


@FUZZ
@given(msgpack_values, st.sampled_from(["get_action", "ping", "reset", "get_modality_config", "kill", "x"]))
def test_gr00t_arbitrary_data_never_crashes(value, endpoint: str) -> None:
    _gr00t_decode_and_map(msgpack.packb({"endpoint": endpoint, "data": value}, use_bin_type=True))
    _gr00t_decode_and_map(msgpack.packb({"endpoint": endpoint, "data": {"video.image": value,
                                                                        "state.x": value}}, use_bin_type=True))
    _gr00t_decode_and_map(msgpack.packb({"endpoint": endpoint, "data": {"observation": value}}, use_bin_type=True))


@FUZZ
@given(st.binary(max_size=400), st.sampled_from(["video.image", "state.x", "annotation.task"]))
def test_gr00t_arbitrary_npy_bytes_never_crash(body: bytes, key: str) -> None:
    for as_npy in (body, b"\x93NUMPY\x01\x00" + body, b"\x93NUMPY\x02\x00" + body):
        _gr00t_decode_and_map(msgpack.packb({"endpoint": "get_action", "data": {key: _npy_map(as_npy)}},
                                            use_bin_type=True))


@FUZZ
@given(
    descr=st.sampled_from(["<f4", "<f8", "|u1", "|O", "<U4", "|V8", "<c8", ">i4", "|b1", "<M8[s]"]),
    shape=st.lists(st.integers(min_value=0, max_value=2**40), max_size=10),
    body=st.binary(max_size=256),
)
def test_gr00t_npy_with_lying_headers(descr: str, shape: list[int], body: bytes) -> None:
    import io

    from server import gr00t_protocol as g

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    try:
        arr = g.decode_ndarray(_npy_map(buf.getvalue() + body), wire.DEFAULT_LIMITS)
    except g.Gr00tError as exc:
        assert exc.code in g.ERROR_CODES
        return
    # Accepted only if the declaration was honest and the dtype numeric.
    assert arr.nbytes == len(body) and arr.shape == tuple(shape) and arr.dtype.name in g.ALLOWED_DTYPES


@FUZZ
@given(
    h=st.integers(min_value=1, max_value=32), w=st.integers(min_value=1, max_value=32),
    t=st.integers(min_value=1, max_value=3),
    state=st.lists(st.floats(min_value=-1e6, max_value=1e6, width=32), min_size=8, max_size=8),
    text=st.text(min_size=1, max_size=50), nested=st.booleans(),
)
def test_gr00t_every_well_formed_get_action_accepted(h: int, w: int, t: int, state: list[float], text: str,
                                                     nested: bool) -> None:
    from client.gr00t_client import libero_gr00t_observation, nested_observation, packb
    from models.gr00t.data_config import LiberoDataConfig
    from server import gr00t_protocol as g

    flat = libero_gr00t_observation(np.zeros((h, w, 3), np.uint8), np.ones((h, w, 3), np.uint8),
                                    np.asarray(state, np.float32), text)
    flat = {k: np.repeat(v, t, axis=0) if isinstance(v, np.ndarray) else v for k, v in flat.items()}
    data = {"observation": nested_observation(flat), "options": None} if nested else flat
    request = g.parse_request(wire.unpackb(packb({"endpoint": "get_action", "data": data})), wire.DEFAULT_LIMITS)
    obs, form = g.flat_observation(request.data)
    assert form == ("n1.6" if nested else "n1.5")
    mapped = wire.validate_observation(g.to_libero_policy(obs, LiberoDataConfig()), wire.DEFAULT_LIMITS)
    assert mapped["image"].shape == (h, w, 3) and mapped["instruction"] == text
    np.testing.assert_array_equal(mapped["state"], np.asarray(state, np.float32))
