"""Property-based fuzzing of the openpi websocket decoder (server/websocket_frontend.py, hypothesis).

The decoder must never raise anything but WireError, never hand back an array larger than the limits or one
whose declaration lied, and accept every well-formed openpi observation; after any hostile frame a good one
still decodes.
"""

from __future__ import annotations

import msgpack
import numpy as np
from fuzz_strategies import FUZZ, msgpack_leaves
from fuzz_strategies import msgpack_values as msgpack_values_of
from hypothesis import given
from hypothesis import strategies as st

from client import wire
from server import websocket_frontend as wsf

LIMITS = wire.WireLimits(max_message_bytes=64 * 1024, max_array_bytes=16 * 1024, max_image_pixels=64 * 64)

msgpack_values = msgpack_values_of(binary_keys=True)
dtype_strings = st.one_of(st.sampled_from(["|O", "|V8", "<c8", "<U4", "|S3", "<f4", ">f8", "|u1", "|b1", "<i8",
                                           "(2,)f4", "f4", "float32", "<M8[s]"]), st.text(max_size=12))
array_maps = st.fixed_dictionaries(
    {b"__ndarray__": st.one_of(st.just(True), msgpack_leaves)},
    optional={b"data": st.one_of(st.binary(max_size=300), msgpack_leaves),
              b"dtype": st.one_of(dtype_strings, msgpack_leaves),
              b"shape": st.one_of(st.lists(st.integers(min_value=-2, max_value=2**40), max_size=10), msgpack_leaves)},
)
generic_maps = st.fixed_dictionaries(
    {b"__npgeneric__": st.just(True)},
    optional={b"data": msgpack_leaves, b"dtype": st.one_of(dtype_strings, msgpack_leaves)},
)
GOOD_OBS = {"observation/image": np.zeros((8, 8, 3), np.uint8), "observation/state": np.arange(8, dtype=np.float32),
            "prompt": "pick up the bowl"}


def _decode(payload: bytes) -> dict | None:
    """Decode as the front end does; None when refused (always with a known error code)."""
    try:
        obs = wsf.to_observation(wsf.unpackb(payload, LIMITS), LIMITS)
    except wire.WireError as exc:
        assert exc.code in wire.ERROR_CODES
        return None
    for value in obs.values():
        if isinstance(value, np.ndarray):
            assert value.nbytes <= LIMITS.max_array_bytes and value.dtype.kind in "biuf"
    return obs


def _good_still_decodes() -> None:
    obs = _decode(wsf.packb(GOOD_OBS))
    assert obs is not None and obs["instruction"] == "pick up the bowl"
    np.testing.assert_array_equal(obs["state"], GOOD_OBS["observation/state"])


@FUZZ
@given(st.binary(max_size=2000))
def test_arbitrary_bytes_never_crash(payload: bytes) -> None:
    _decode(payload)
    _good_still_decodes()


@FUZZ
@given(msgpack_values)
def test_arbitrary_msgpack_structures_never_crash(value) -> None:
    _decode(msgpack.packb(value, use_bin_type=True))
    _good_still_decodes()


@FUZZ
@given(st.dictionaries(st.text(max_size=20), st.one_of(array_maps, generic_maps, msgpack_values), max_size=4))
def test_lying_array_maps_never_crash(obs) -> None:
    obs = _decode(msgpack.packb(obs, use_bin_type=True))
    if obs is not None:  # accepted only if every declaration was honest
        for value in obs.values():
            if isinstance(value, np.ndarray):
                assert value.ndim <= 8
    _good_still_decodes()


@FUZZ
@given(msgpack_values, st.integers(min_value=1, max_value=200))
def test_truncated_messages_never_crash(value, cut: int) -> None:
    payload = wsf.packb({**GOOD_OBS, "extra": value})
    _decode(payload[: max(0, len(payload) - cut)])
    _good_still_decodes()


@FUZZ
@given(
    h=st.integers(min_value=1, max_value=64), w=st.integers(min_value=1, max_value=64),
    state=st.lists(st.floats(min_value=-1e6, max_value=1e6, width=32), min_size=1, max_size=16),
    text=st.text(max_size=100), big_endian=st.booleans(),
)
def test_every_well_formed_observation_accepted(h: int, w: int, state: list[float], text: str,
                                                big_endian: bool) -> None:
    arr = np.asarray(state, np.float32)
    sent = {"observation/image": np.zeros((h, w, 3), np.uint8),
            "observation/state": arr.astype(">f4") if big_endian else arr, "prompt": text, "step": np.int32(h)}
    obs = _decode(wsf.packb(sent))
    assert obs is not None and obs["image"].shape == (h, w, 3) and obs["instruction"] == text
    assert obs["step"] == h and obs["state"].dtype.isnative
    np.testing.assert_array_equal(obs["state"], arr)
