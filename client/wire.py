"""The wire protocol: one msgpack map per ZeroMQ message, numpy arrays as a msgpack ext type.

This module is the single owner of the codec; the server imports it from here so the light client
package (numpy, msgpack, pyzmq only) and the server can never drift apart. Nothing here ever
unpickles: arrays are an allow-listed dtype code, a shape and raw little-endian bytes, decoded
zero-copy with ``np.frombuffer`` after the declared size has been checked against the bytes that
actually arrived (a message that *claims* a 10 GB array is refused before anything is allocated).

Message schema (docs/wire_protocol.md)::

    request  {"v": 1, "type": "infer"|"ping"|"metadata"|"reset"|"stats", "id": str|int, "obs": {...}}
    reply    {"v": 1, "id": <echo>, "ok": True, ...payload}
    error    {"v": 1, "id": <echo or None>, "ok": False, "error": {"code": ..., "message": ...}}
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
NDARRAY_EXT_CODE = 42  # array inline in the msgpack map
OOB_NDARRAY_EXT_CODE = 43  # array carried in its own ZeroMQ frame after the msgpack header frame
# Arrays at least this large travel out of band (zero-copy on both sides); smaller ones inline.
OOB_MIN_BYTES = 16 * 1024
#: First byte of the routing tag frame the replica front end (server/replicas.py) puts before an empty delimiter
#: frame when it forwards a request to a replica: 0xc1 is the one byte msgpack never uses, so no header frame can
#: start with it and a server tells ``[tag, b"", *payload]`` from a client's ``[header, *arrays]`` by it alone.
ROUTE_TAG_PREFIX = b"\xc1"

REQUEST_TYPES = ("infer", "ping", "metadata", "reset", "stats")

# Error codes a reply may carry. Clients switch on these, so they are part of the protocol.
ERR_BAD_REQUEST = "bad_request"
ERR_TOO_LARGE = "too_large"
ERR_INTERNAL = "internal"
ERR_OVERLOADED = "overloaded"
ERR_TIMEOUT = "timeout"
ERR_UNSUPPORTED_VERSION = "unsupported_version"
ERR_LOADING = "loading"  # the server is up but its policy is still loading (retry once ping says "ready")
ERROR_CODES = (ERR_BAD_REQUEST, ERR_TOO_LARGE, ERR_INTERNAL, ERR_OVERLOADED, ERR_TIMEOUT, ERR_UNSUPPORTED_VERSION,
               ERR_LOADING)

# dtype allow-list: one byte code each. No object, void, string or complex dtypes can ever travel.
_DTYPE_CODES: dict[str, int] = {
    "bool": 1,
    "uint8": 2,
    "int8": 3,
    "uint16": 4,
    "int16": 5,
    "uint32": 6,
    "int32": 7,
    "uint64": 8,
    "int64": 9,
    "float16": 10,
    "float32": 11,
    "float64": 12,
}
_CODE_DTYPES: dict[int, np.dtype] = {code: np.dtype(name).newbyteorder("<") for name, code in _DTYPE_CODES.items()}
# Looked up by dtype object: ``dtype.name`` builds a string each call (~3 us, twice per array).
_CODE_BY_DTYPE: dict[np.dtype, int] = {np.dtype(name): code for name, code in _DTYPE_CODES.items()}


def _dtype_code(dtype: np.dtype) -> int | None:
    """The allow-list code of ``dtype`` (either byte order), or None."""
    code = _CODE_BY_DTYPE.get(dtype)
    if code is None and dtype.byteorder == ">":
        code = _CODE_BY_DTYPE.get(dtype.newbyteorder("<"))
    return code
_MAX_NDIM = 8
_HEADER = struct.Struct("<BB")  # dtype code, ndim; followed by ndim little-endian uint64 dims


class WireError(ValueError):
    """A message that cannot be decoded or violates the schema; ``code`` is the reply's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class WireLimits:
    """Bounds the decoder enforces before it allocates anything.

    The defaults admit two 512x512 RGB images plus state comfortably; the server sets them from its
    config (``--max-message-bytes``, ``--max-image-pixels``).
    """

    max_message_bytes: int = 8 * 1024 * 1024
    max_array_bytes: int = 4 * 1024 * 1024
    max_container_len: int = 4096
    max_str_len: int = 64 * 1024
    max_image_pixels: int = 1024 * 1024


DEFAULT_LIMITS = WireLimits()


def _encode_ndarray(arr: np.ndarray) -> msgpack.ExtType:
    code = _dtype_code(arr.dtype)
    if code is None:
        raise TypeError(f"dtype {arr.dtype} is not allowed on the wire (allowed: {sorted(_DTYPE_CODES)})")
    if arr.ndim > _MAX_NDIM:
        raise TypeError(f"arrays of more than {_MAX_NDIM} dimensions are not allowed on the wire")
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    arr = np.ascontiguousarray(arr)
    header = _HEADER.pack(code, arr.ndim) + struct.pack(f"<{arr.ndim}Q", *arr.shape)
    return msgpack.ExtType(NDARRAY_EXT_CODE, header + arr.tobytes())


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return _encode_ndarray(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot send a {type(obj).__name__} over the wire")


def _decode_ndarray(data: bytes, limits: WireLimits) -> np.ndarray:
    dtype, shape, offset = _parse_array_header(data, "array ext payload")
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes > limits.max_array_bytes:
        raise WireError(ERR_TOO_LARGE, f"array of shape {shape} ({nbytes} bytes) exceeds {limits.max_array_bytes}")
    if nbytes != len(data) - offset:
        raise WireError(
            ERR_BAD_REQUEST, f"array declares shape {shape} {dtype.name} but carries {len(data) - offset} bytes"
        )
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)  # zero-copy view


def packb(message: dict[str, Any]) -> bytes:
    """Serialise one message (a dict) to bytes."""
    return msgpack.packb(message, default=_default, use_bin_type=True)


def unpackb(payload: bytes, limits: WireLimits = DEFAULT_LIMITS) -> Any:
    """Deserialise a single-frame message, with arrays as read-only numpy views.

    Raises :class:`WireError` for anything that is not well-formed msgpack within ``limits``.
    """
    if len(payload) > limits.max_message_bytes:
        raise WireError(ERR_TOO_LARGE, f"message of {len(payload)} bytes exceeds {limits.max_message_bytes}")
    return _unpack(payload, limits, None)


def _unpack(payload: bytes | memoryview, limits: WireLimits, oob: Any) -> Any:
    def ext_hook(code: int, data: bytes) -> Any:
        if code == NDARRAY_EXT_CODE:
            return _decode_ndarray(data, limits)
        if code == OOB_NDARRAY_EXT_CODE and oob is not None:
            return oob(data)
        raise WireError(ERR_BAD_REQUEST, f"unknown msgpack ext type {code}")

    try:
        return msgpack.unpackb(
            payload,
            ext_hook=ext_hook,
            raw=False,
            strict_map_key=True,
            max_str_len=limits.max_str_len,
            max_bin_len=limits.max_array_bytes,
            max_array_len=limits.max_container_len,
            max_map_len=limits.max_container_len,
            max_ext_len=limits.max_array_bytes + 128,
        )
    except WireError:
        raise
    except (ValueError, TypeError, msgpack.exceptions.ExtraData, msgpack.exceptions.FormatError) as exc:
        # ValueError covers msgpack's own limit/depth errors and truncated input.
        raise WireError(ERR_BAD_REQUEST, f"undecodable message: {type(exc).__name__}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - msgpack raises a few odd types on hostile input
        raise WireError(ERR_BAD_REQUEST, f"undecodable message: {type(exc).__name__}") from None


def _parse_array_header(data: bytes | memoryview, what: str) -> tuple[np.dtype, tuple[int, ...], int]:
    if len(data) < _HEADER.size:
        raise WireError(ERR_BAD_REQUEST, f"{what} is shorter than its header")
    code, ndim = _HEADER.unpack_from(data)
    dtype = _CODE_DTYPES.get(code)
    if dtype is None:
        raise WireError(ERR_BAD_REQUEST, f"array dtype code {code} is not on the allow-list")
    if ndim > _MAX_NDIM:
        raise WireError(ERR_BAD_REQUEST, f"array has {ndim} dimensions (max {_MAX_NDIM})")
    offset = _HEADER.size + 8 * ndim
    if len(data) < offset:
        raise WireError(ERR_BAD_REQUEST, f"{what} is shorter than its shape")
    return dtype, struct.unpack_from(f"<{ndim}Q", data, _HEADER.size), offset


def pack_frames(message: dict[str, Any]) -> list[bytes | memoryview]:
    """Serialise a message to frames: [msgpack header, raw array frames...] (see module doc)."""
    buffers: list[bytes | memoryview] = []

    def default(obj: Any) -> Any:
        code = _dtype_code(obj.dtype) if isinstance(obj, np.ndarray) and obj.nbytes >= OOB_MIN_BYTES else None
        if code is not None:
            arr = obj
            if arr.dtype.byteorder == ">":
                arr = arr.astype(arr.dtype.newbyteorder("<"))
            arr = np.ascontiguousarray(arr)
            if arr.ndim > _MAX_NDIM:
                raise TypeError(f"arrays of more than {_MAX_NDIM} dimensions are not allowed on the wire")
            buffers.append(memoryview(arr).cast("B"))
            header = _HEADER.pack(code, arr.ndim) + struct.pack(
                f"<{arr.ndim}QI", *arr.shape, len(buffers))
            return msgpack.ExtType(OOB_NDARRAY_EXT_CODE, header)
        return _default(obj)

    head = msgpack.packb(message, default=default, use_bin_type=True)
    return [head, *buffers]


def unpack_frames(frames: list[Any], limits: WireLimits = DEFAULT_LIMITS) -> Any:
    """Inverse of :func:`pack_frames`. ``frames`` may be bytes or pyzmq ``Frame`` objects.

    Out-of-band arrays are read-only views over the received frames (zero-copy); every declared
    shape is checked against the frame that carries it before the view is made.
    """
    if not frames:
        raise WireError(ERR_BAD_REQUEST, "empty message")
    views = [f.buffer if hasattr(f, "buffer") else memoryview(f) for f in frames]
    total = sum(v.nbytes for v in views)
    if total > limits.max_message_bytes:
        raise WireError(ERR_TOO_LARGE, f"message of {total} bytes exceeds {limits.max_message_bytes}")
    used: set[int] = set()

    def oob(data: bytes) -> np.ndarray:
        dtype, shape, offset = _parse_array_header(data, "out-of-band array reference")
        if len(data) != offset + 4:
            raise WireError(ERR_BAD_REQUEST, "malformed out-of-band array reference")
        (index,) = struct.unpack_from("<I", data, offset)
        if not 1 <= index < len(views) or index in used:
            raise WireError(ERR_BAD_REQUEST, f"out-of-band array refers to frame {index}, which is missing or reused")
        used.add(index)
        view = views[index]
        count = math.prod(shape)
        if count * dtype.itemsize > limits.max_array_bytes:
            raise WireError(ERR_TOO_LARGE, f"array of shape {shape} exceeds {limits.max_array_bytes} bytes")
        if count * dtype.itemsize != view.nbytes:
            raise WireError(ERR_BAD_REQUEST,
                            f"array declares shape {shape} {dtype.name} but its frame carries {view.nbytes} bytes")
        return np.frombuffer(view, dtype=dtype, count=count).reshape(shape)

    message = _unpack(views[0], limits, oob)
    if len(used) != len(views) - 1:
        raise WireError(ERR_BAD_REQUEST, f"{len(views) - 1 - len(used)} array frame(s) are not referenced")
    return message


# ----------------------------------------------------------------------------------------------
# Schema


@dataclass
class Request:
    """A validated request. ``obs`` is only populated for ``infer``."""

    type: str
    id: Any
    obs: dict[str, Any] = field(default_factory=dict)
    options: dict[str, Any] = field(default_factory=dict)


def _check_id(value: Any) -> Any:
    if value is None or isinstance(value, (str, int)) and not isinstance(value, bool):
        if isinstance(value, str) and len(value) > 256:
            raise WireError(ERR_BAD_REQUEST, "'id' is longer than 256 characters")
        return value
    raise WireError(ERR_BAD_REQUEST, "'id' must be a string or an integer")


def request_id_of(message: Any) -> Any:
    """Best-effort id of a (possibly invalid) decoded message, to echo it in an error reply."""
    if isinstance(message, dict):
        try:
            return _check_id(message.get("id"))
        except WireError:
            return None
    return None


def validate_observation(obs: Any, limits: WireLimits = DEFAULT_LIMITS) -> dict[str, Any]:
    """Generic checks every policy relies on; policies add their own (required keys, sizes).

    - keys are strings; values are arrays, strings, numbers, bools or None (no nested maps),
    - images (``image``, ``wrist_image``, ``video.*``) are uint8 ``H x W x 3`` (or ``T x H x W x 3``)
      within ``max_image_pixels``,
    - float arrays (state) are finite.
    """
    if not isinstance(obs, dict):
        raise WireError(ERR_BAD_REQUEST, "'obs' must be a map")
    for key, value in obs.items():
        if isinstance(value, np.ndarray):
            if key in ("image", "wrist_image") or key.startswith("video."):
                _check_image(key, value, limits)
            elif value.dtype.kind == "f" and not np.isfinite(value).all():
                raise WireError(ERR_BAD_REQUEST, f"obs[{key!r}] contains NaN or inf")
        elif isinstance(value, (dict, list, tuple)):
            if key.startswith("annotation.") and isinstance(value, (list, tuple)):
                if not all(isinstance(v, str) for v in value):
                    raise WireError(ERR_BAD_REQUEST, f"obs[{key!r}] must be a string or a list of strings")
                continue
            raise WireError(ERR_BAD_REQUEST, f"obs[{key!r}] must be an array, a string or a number")
        elif isinstance(value, float) and not math.isfinite(value):
            raise WireError(ERR_BAD_REQUEST, f"obs[{key!r}] is NaN or inf")
    return obs


def _check_image(key: str, value: np.ndarray, limits: WireLimits) -> None:
    if value.dtype != np.uint8:
        raise WireError(ERR_BAD_REQUEST, f"obs[{key!r}] must be uint8, got {value.dtype.name}")
    if value.ndim not in (3, 4) or value.shape[-1] != 3:
        raise WireError(ERR_BAD_REQUEST, f"obs[{key!r}] must be HxWx3 (or TxHxWx3), got shape {value.shape}")
    height, width = value.shape[-3], value.shape[-2]
    if height == 0 or width == 0:
        raise WireError(ERR_BAD_REQUEST, f"obs[{key!r}] is empty")
    if height * width > limits.max_image_pixels:
        raise WireError(
            ERR_TOO_LARGE, f"obs[{key!r}] has {height}x{width} pixels, more than {limits.max_image_pixels}"
        )


def parse_request(message: Any, limits: WireLimits = DEFAULT_LIMITS) -> Request:
    """Validate a decoded message against the request schema."""
    if not isinstance(message, dict):
        raise WireError(ERR_BAD_REQUEST, "a request must be a msgpack map")
    version = message.get("v", PROTOCOL_VERSION)
    if version != PROTOCOL_VERSION:
        raise WireError(
            ERR_UNSUPPORTED_VERSION, f"protocol version {version!r} is not supported (server speaks {PROTOCOL_VERSION})"
        )
    req_id = _check_id(message.get("id"))
    req_type = message.get("type")
    if req_type not in REQUEST_TYPES:
        raise WireError(ERR_BAD_REQUEST, f"unknown request type {req_type!r} (expected one of {list(REQUEST_TYPES)})")
    options = message.get("options") or {}
    if not isinstance(options, dict):
        raise WireError(ERR_BAD_REQUEST, "'options' must be a map")
    if req_type != "infer":
        return Request(type=req_type, id=req_id, options=options)
    if "obs" not in message:
        raise WireError(ERR_BAD_REQUEST, "an 'infer' request needs an 'obs' map")
    obs = validate_observation(message["obs"], limits)
    return Request(type=req_type, id=req_id, obs=obs, options=options)


def make_request(req_type: str, req_id: Any, obs: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    msg: dict[str, Any] = {"v": PROTOCOL_VERSION, "type": req_type, "id": req_id}
    if obs is not None:
        msg["obs"] = obs
    if options:
        msg["options"] = options
    return msg


def ok_reply(req_id: Any, **payload: Any) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": req_id, "ok": True, **payload}


def error_reply(req_id: Any, code: str, message: str) -> dict[str, Any]:
    return {"v": PROTOCOL_VERSION, "id": req_id, "ok": False, "error": {"code": code, "message": message}}
