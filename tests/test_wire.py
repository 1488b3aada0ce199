"""Unit tests of the wire codec and request schema (no sockets)."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest

from client import wire


def _obs() -> dict:
    rng = np.random.default_rng(0)
    return {
        "image": rng.integers(0, 255, (256, 256, 3), dtype=np.uint8),
        "wrist_image": rng.integers(0, 255, (256, 256, 3), dtype=np.uint8),
        "state": rng.standard_normal(8).astype(np.float32),
        "instruction": "pick up the black bowl and place it on the plate",
    }


@pytest.mark.parametrize("dtype", ["bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32",
                                   "uint64", "float16", "float32", "float64"])
def test_array_round_trip_every_allowed_dtype(dtype: str) -> None:
    arr = (np.arange(24).reshape(2, 3, 4) % 2 == 0) if dtype == "bool" else np.arange(24, dtype=dtype).reshape(2, 3, 4)
    out = wire.unpackb(wire.packb({"a": arr}))["a"]
    assert out.dtype == arr.dtype and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_decode_is_zero_copy_view() -> None:
    payload = wire.packb({"x": np.arange(1000, dtype=np.float32)})
    out = wire.unpackb(payload)["x"]
    assert not out.flags.owndata and not out.flags.writeable


def test_big_endian_and_non_contiguous_inputs_are_normalised() -> None:
    arr = np.arange(12, dtype=">f4").reshape(3, 4)[:, ::2]
    out = wire.unpackb(wire.packb({"a": arr}))["a"]
    np.testing.assert_array_equal(out, arr.astype(np.float32))


@pytest.mark.parametrize("bad", [np.array(["a", "b"]), np.array([1 + 2j]), np.array([object()], dtype=object)])
def test_disallowed_dtypes_refused_on_encode(bad: np.ndarray) -> None:
    with pytest.raises(TypeError):
        wire.packb({"a": bad})


def test_non_serialisable_object_refused() -> None:
    class Evil:
        pass

    with pytest.raises(TypeError):
        wire.packb({"a": Evil()})


def _ext(code: int, ndim: int, shape: tuple[int, ...], body: bytes) -> bytes:
    header = struct.pack("<BB", code, ndim) + struct.pack(f"<{len(shape)}Q", *shape)
    return msgpack.packb({"a": msgpack.ExtType(wire.NDARRAY_EXT_CODE, header + body)})


def test_lying_shape_refused() -> None:
    with pytest.raises(wire.WireError) as exc:
        wire.unpackb(_ext(11, 2, (10, 10), b"\0" * 16))
    assert exc.value.code == wire.ERR_BAD_REQUEST


def test_huge_declared_array_refused_before_allocation() -> None:
    # 10 GB declared, 8 bytes carried: refused as too large without allocating anything.
    with pytest.raises(wire.WireError) as exc:
        wire.unpackb(_ext(2, 1, (10 * 1024**3,), b"\0" * 8))
    assert exc.value.code == wire.ERR_TOO_LARGE


def test_unknown_dtype_code_and_ext_type_refused() -> None:
    with pytest.raises(wire.WireError):
        wire.unpackb(_ext(99, 1, (1,), b"\0"))
    with pytest.raises(wire.WireError):
        wire.unpackb(msgpack.packb({"a": msgpack.ExtType(7, b"xx")}))


@pytest.mark.parametrize("payload", [b"", b"\xc1", b"\x92\x01", b"\xdf\xff\xff\xff\xff", b"\xff" * 50])
def test_garbage_raises_wire_error(payload: bytes) -> None:
    with pytest.raises(wire.WireError):
        wire.unpackb(payload)


def test_deep_nesting_refused() -> None:
    payload = b"\x91" * 5000 + b"\x00"
    with pytest.raises(wire.WireError):
        wire.unpackb(payload)


def test_message_size_limit() -> None:
    limits = wire.WireLimits(max_message_bytes=1000)
    with pytest.raises(wire.WireError) as exc:
        wire.unpackb(b"\x00" * 1001, limits)
    assert exc.value.code == wire.ERR_TOO_LARGE


def test_request_schema_round_trip() -> None:
    msg = wire.make_request("infer", "s:1", _obs())
    req = wire.parse_request(wire.unpackb(wire.packb(msg)))
    assert req.type == "infer" and req.id == "s:1"
    assert req.obs["image"].shape == (256, 256, 3)
    assert req.obs["instruction"].startswith("pick up")


@pytest.mark.parametrize(
    "message, code",
    [
        ([1, 2, 3], wire.ERR_BAD_REQUEST),
        ({"v": 1, "type": "dance", "id": 1}, wire.ERR_BAD_REQUEST),
        ({"v": 2, "type": "ping", "id": 1}, wire.ERR_UNSUPPORTED_VERSION),
        ({"v": 1, "type": "infer", "id": 1}, wire.ERR_BAD_REQUEST),
        ({"v": 1, "type": "infer", "id": 1, "obs": [1]}, wire.ERR_BAD_REQUEST),
        ({"v": 1, "type": "infer", "id": {"x": 1}, "obs": {}}, wire.ERR_BAD_REQUEST),
        ({"v": 1, "type": "infer", "id": 1, "obs": {"image": np.zeros((4, 4), np.uint8)}}, wire.ERR_BAD_REQUEST),
        ({"v": 1, "type": "infer", "id": 1, "obs": {"image": np.zeros((4, 4, 3), np.float32)}}, wire.ERR_BAD_REQUEST),
        ({"v": 1, "type": "infer", "id": 1, "obs": {"image": np.zeros((2048, 2048, 3), np.uint8)}}, wire.ERR_TOO_LARGE),
        ({"v": 1, "type": "infer", "id": 1, "obs": {"state": np.array([np.nan], np.float32)}}, wire.ERR_BAD_REQUEST),
        ({"v": 1, "type": "infer", "id": 1, "obs": {"nested": {"a": 1}}}, wire.ERR_BAD_REQUEST),
    ],
)
def test_schema_violations(message, code) -> None:
    limits = wire.WireLimits(max_array_bytes=64 * 1024 * 1024, max_message_bytes=64 * 1024 * 1024)
    with pytest.raises(wire.WireError) as exc:
        wire.parse_request(wire.unpackb(wire.packb(message), limits), limits)
    assert exc.value.code == code


def test_gr00t_style_keys_accepted() -> None:
    obs = {
        "video.image": np.zeros((1, 64, 64, 3), np.uint8),
        "state.x": np.zeros((1, 1), np.float64),
        "annotation.human.action.task_description": ["put the bowl on the plate"],
    }
    req = wire.parse_request(wire.unpackb(wire.packb(wire.make_request("infer", 3, obs))))
    assert req.obs["video.image"].shape == (1, 64, 64, 3)


def test_error_reply_shape() -> None:
    reply = wire.error_reply("x", wire.ERR_OVERLOADED, "busy")
    assert reply == {"v": 1, "id": "x", "ok": False, "error": {"code": "overloaded", "message": "busy"}}


def test_multipart_frames_round_trip_zero_copy() -> None:
    obs = _obs()
    frames = wire.pack_frames(wire.make_request("infer", 9, obs))
    assert len(frames) == 3  # header + two images out of band; state stays inline
    msg = wire.unpack_frames([bytes(f) for f in frames])
    np.testing.assert_array_equal(msg["obs"]["image"], obs["image"])
    np.testing.assert_array_equal(msg["obs"]["state"], obs["state"])
    assert not msg["obs"]["image"].flags.writeable


def test_multipart_lying_or_dangling_frames_refused() -> None:
    frames = [bytes(f) for f in wire.pack_frames({"a": np.zeros((96, 96, 3), np.uint8)})]
    with pytest.raises(wire.WireError):  # frame shorter than declared
        wire.unpack_frames([frames[0], frames[1][:-1]])
    with pytest.raises(wire.WireError):  # referenced frame missing
        wire.unpack_frames([frames[0]])
    with pytest.raises(wire.WireError):  # extra frame nobody refers to
        wire.unpack_frames([*frames, b"junk"])
    with pytest.raises(wire.WireError) as exc:
        wire.unpack_frames(frames, wire.WireLimits(max_message_bytes=1000))
    assert exc.value.code == wire.ERR_TOO_LARGE
