"""Isaac-GR00T's ZeroMQ policy protocol, served on the main port beside our own (docs/gr00t_protocol.md).

Why: a GR00T user's client (``gr00t/eval/service.py`` in N1.5, ``gr00t/policy/server_client.py`` in N1.6) and
their LIBERO evaluation should point at this server unchanged. This module is the one owner of that protocol:
the ``__ndarray_class__`` codec, request validation within the same :class:`client.wire.WireLimits` as our own
protocol (every size is checked before anything is allocated), the mapping from GR00T modality keys to what the
served policy takes, and the endpoint dispatch. The server core (``server/app.py``) only detects the protocol
per message (a map with ``"endpoint"``) and hands the decoded map to :class:`Gr00tFrontEnd`.

Wire format (a REQ client; one msgpack frame each way)::

    request  {"endpoint": "ping"|"get_action"|"get_modality_config"|"reset"|"kill", "data": {...}, "api_token"?}
    array    {"__ndarray_class__": True, "as_npy": <np.save bytes>}   (decoded with allow_pickle=False only)
    error    {"error": "<message>"}

``get_action`` comes in two forms. N1.5: ``data`` is the flat observation (``video.image`` ``[T,H,W,3]``,
``state.x`` ``[T,d]``, ``annotation.human.action.task_description`` ``[str]``) and the reply is a map of
``action.<key>`` arrays ``[H, d]``. N1.6: ``data = {"observation": {"video": {...}, "state": {...},
"language": {...}}, "options": {...}}`` with a leading batch axis of 1, and the reply is ``[actions, info]``
with bare keys and arrays ``[1, H, d]``.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from client import wire
from client.gr00t_client import NDARRAY_TAG
from models.gr00t.data_config import LANGUAGE_KEY, LiberoDataConfig

logger = logging.getLogger(__name__)

ENDPOINTS = ("ping", "get_action", "get_modality_config", "reset", "kill")
MODALITY_TAG = "__ModalityConfig_class__"
# The same numeric allow-list as our own wire format: no object, string, void or complex dtypes.
ALLOWED_DTYPES = ("bool", "uint8", "int8", "uint16", "int16", "uint32", "int32", "uint64", "int64",
                  "float16", "float32", "float64")
MAX_NDIM = 8
# Room for the .npy preamble and header dict on top of the array bytes (numpy pads headers to 64 bytes).
NPY_HEADER_ALLOWANCE = 4096
MAX_NESTING = 8
MODALITY_FORMATS = ("n1.5", "n1.6")  # as_json as a JSON string (N1.5) or as a map (N1.6)
ERR_UNAUTHORIZED = "unauthorized"
ERR_FORBIDDEN = "forbidden"
#: Codes a GR00T-protocol failure is counted under in the ``stats`` endpoint (the reply itself is a string).
ERROR_CODES = (*wire.ERROR_CODES, ERR_UNAUTHORIZED, ERR_FORBIDDEN)


class Gr00tError(ValueError):
    """A GR00T-protocol request that cannot be served; ``code`` counts it in the server stats."""

    def __init__(self, message: str, code: str = wire.ERR_BAD_REQUEST) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


# ---------------------------------------------------------------------------------------------- codec
def error_reply(message: str) -> dict[str, str]:
    """What GR00T's clients recognise as a failure: a map with a string ``"error"``."""
    return {"error": message}


_PREAMBLE = 8  # b"\x93NUMPY" + major + minor
# Parsed, validated headers by their bytes: a client sends the same few shapes every step, and parsing a header
# (a Python literal) is most of the cost of an array; bounded, cleared when full.
_HEADER_CACHE: dict[bytes, tuple[tuple[int, ...], np.dtype, int]] = {}
_HEADER_CACHE_MAX = 512


def _npy_header(head: bytes) -> tuple[tuple[int, ...], np.dtype, int]:
    """``(shape, dtype, data offset)`` of a ``.npy`` preamble + header, validated (allowed numeric dtype, C or
    Fortran order, at most ``MAX_NDIM`` dims); ``head`` is the start of the array bytes."""
    if len(head) < _PREAMBLE + 2 or head[:6] != b"\x93NUMPY":
        raise Gr00tError("bad .npy header: not an .npy array (magic string missing)")
    major = head[6]
    width = 2 if major == 1 else 4 if major in (2, 3) else 0
    if not width or len(head) < _PREAMBLE + width:
        raise Gr00tError(f"bad .npy header: unsupported .npy version {major}.{head[7]}")
    hlen = int.from_bytes(head[_PREAMBLE:_PREAMBLE + width], "little")
    offset = _PREAMBLE + width + hlen
    if hlen > NPY_HEADER_ALLOWANCE or len(head) < offset:
        raise Gr00tError(f"bad .npy header: header of {hlen} bytes is too long or truncated")
    key = head[:offset]
    cached = _HEADER_CACHE.get(key)
    if cached is not None:
        return cached
    fp = io.BytesIO(key)
    fp.seek(_PREAMBLE)
    try:
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        shape, _fortran, dtype = read(fp, max_header_size=NPY_HEADER_ALLOWANCE)
    except (ValueError, SyntaxError, TypeError, OverflowError, MemoryError, RecursionError) as exc:
        raise Gr00tError(f"bad .npy header: {exc}") from None
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None or dtype.name not in ALLOWED_DTYPES:
        raise Gr00tError(f"array dtype {dtype.str!r} is not allowed (allowed: {', '.join(ALLOWED_DTYPES)})")
    if len(shape) > MAX_NDIM or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise Gr00tError(f"array shape {shape} is not allowed (at most {MAX_NDIM} non-negative dims)")
    if len(_HEADER_CACHE) >= _HEADER_CACHE_MAX:
        _HEADER_CACHE.clear()
    _HEADER_CACHE[key] = (shape, dtype, offset)
    return shape, dtype, offset


def decode_ndarray(obj: dict[str, Any], limits: wire.WireLimits) -> np.ndarray:
    """Decode a tagged ``np.save`` map after checking its size, header, dtype and shape against ``limits``."""
    data = obj.get("as_npy")
    if set(obj) != {NDARRAY_TAG, "as_npy"} or obj[NDARRAY_TAG] is not True:
        raise Gr00tError("an ndarray map must be exactly {'__ndarray_class__': True, 'as_npy': <bytes>}")
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise Gr00tError("'as_npy' must be bytes")
    if len(data) > limits.max_array_bytes + NPY_HEADER_ALLOWANCE:
        raise Gr00tError(f"array of {len(data)} bytes exceeds {limits.max_array_bytes}", wire.ERR_TOO_LARGE)
    shape, dtype, offset = _npy_header(bytes(data[:_PREAMBLE + 4 + NPY_HEADER_ALLOWANCE]))
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes > limits.max_array_bytes:
        raise Gr00tError(f"array of shape {shape} ({nbytes} bytes) exceeds {limits.max_array_bytes}",
                         wire.ERR_TOO_LARGE)
    if nbytes != len(data) - offset:
        raise Gr00tError(f"array declares shape {shape} {dtype.name} but carries {len(data) - offset} bytes")
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError) as exc:  # pragma: no cover - the checks above admit only well-formed arrays
        raise Gr00tError(f"undecodable array: {exc}") from None
    return arr


def decode_tree(obj: Any, limits: wire.WireLimits, depth: int = 0) -> Any:
    """Replace every tagged ndarray map in ``obj`` by its array; other values pass (raw arrays are refused)."""
    if depth > MAX_NESTING:
        raise Gr00tError(f"message nests deeper than {MAX_NESTING} levels")
    if isinstance(obj, dict):
        if NDARRAY_TAG in obj:
            return decode_ndarray(obj, limits)
        return {k: decode_tree(v, limits, depth + 1) for k, v in obj.items()}
    if isinstance(obj, list):
        return [decode_tree(v, limits, depth + 1) for v in obj]
    if isinstance(obj, np.ndarray):  # our own ext type inside a GR00T message: one format per protocol
        raise Gr00tError("arrays must be sent as {'__ndarray_class__': True, 'as_npy': ...} maps")
    return obj


# ---------------------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class Gr00tRequest:
    """A validated request: the endpoint and its (decoded) ``data`` map."""

    endpoint: str
    data: dict[str, Any]


def parse_request(message: Any, limits: wire.WireLimits, api_token: str | None = None) -> Gr00tRequest:
    """Validate a decoded map against the request schema and the server's ``--api-token``."""
    if not isinstance(message, dict):
        raise Gr00tError("a request must be a msgpack map")
    if api_token is not None:
        given = message.get("api_token")
        if not isinstance(given, str) or not hmac.compare_digest(given.encode(), api_token.encode()):
            raise Gr00tError("Unauthorized: invalid API token", ERR_UNAUTHORIZED)
    endpoint = message.get("endpoint")
    if endpoint not in ENDPOINTS:
        raise Gr00tError(f"unknown endpoint {endpoint!r} (expected one of {list(ENDPOINTS)})")
    data = message.get("data")
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise Gr00tError("'data' must be a map")
    return Gr00tRequest(endpoint, decode_tree(data, limits))


def is_gr00t_message(message: Any) -> bool:
    """GR00T's requests are maps with ``"endpoint"``; ours carry ``"v"``/``"type"``."""
    return isinstance(message, dict) and "endpoint" in message and "type" not in message and "v" not in message


# ---------------------------------------------------------------------------------------------- key mapping
def _last_step(key: str, value: Any, batched: bool, ndim: int) -> np.ndarray:
    """``[T, ...]`` (``[1, T, ...]`` when ``batched``) -> the last step with a leading axis of 1."""
    if not isinstance(value, np.ndarray):
        raise Gr00tError(f"{key!r} must be an array")
    if batched:
        if value.ndim != ndim + 1 or value.shape[0] != 1:
            raise Gr00tError(f"{key!r} must have a batch axis of 1 (one observation per request), got "
                             f"shape {value.shape}")
        value = value[0]
    if value.ndim == ndim - 1:
        value = value[None]
    if value.ndim != ndim or value.shape[0] == 0:
        raise Gr00tError(f"{key!r} has shape {value.shape}; expected {ndim} dims with T >= 1")
    return value[-1:]


def _instruction(key: str, value: Any, batched: bool) -> str:
    while isinstance(value, list) and len(value) == 1:
        value = value[0]
    if batched and isinstance(value, list):
        raise Gr00tError(f"{key!r} must hold one instruction (batch of 1)")
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        value = value[-1]
    if not isinstance(value, str):
        raise Gr00tError(f"{key!r} must be a string or a list of strings")
    return value


def flat_observation(data: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The request's observation as canonical flat GR00T keys, and its form ("n1.5" or "n1.6").

    Canonical: ``video.<k>`` uint8 ``[1, H, W, 3]`` and ``state.<k>`` ``[1, d]`` (the last step of the history
    sent), language under ``annotation.*`` as one string.
    """
    batched = isinstance(data.get("observation"), dict)
    if batched:
        flat: dict[str, Any] = {}
        for modality, group in data["observation"].items():
            if modality not in ("video", "state", "language") or not isinstance(group, dict):
                raise Gr00tError(f"observation[{modality!r}] must be a 'video', 'state' or 'language' map")
            for key, value in group.items():
                if not isinstance(key, str):
                    raise Gr00tError("observation keys must be strings")
                if modality == "language":
                    flat[key if key.startswith("annotation.") else f"annotation.{key}"] = value
                else:
                    flat[key if key.startswith(f"{modality}.") else f"{modality}.{key}"] = value
    else:
        flat = data
    obs: dict[str, Any] = {}
    for key, value in flat.items():
        if not isinstance(key, str):
            raise Gr00tError("observation keys must be strings")
        if key.startswith("video."):
            obs[key] = _last_step(key, value, batched, 4)
        elif key.startswith("state."):
            arr = _last_step(key, value, batched, 2)
            if arr.dtype.kind not in "fiu":
                raise Gr00tError(f"{key!r} must be numeric")
            obs[key] = arr.astype(np.float64) if arr.dtype.kind != "f" else arr
        elif key.startswith("annotation."):
            obs[key] = _instruction(key, value, batched)
        else:
            raise Gr00tError(f"observation key {key!r} is not a video.*, state.* or annotation.* key")
    return obs, "n1.6" if batched else "n1.5"


def to_gr00t_policy(obs: dict[str, Any]) -> dict[str, Any]:
    """What :class:`~server.policies.model_policies.GR00TPolicy` takes: the GR00T keys, language as ``[str]``."""
    out = {k: v for k, v in obs.items() if not k.startswith("annotation.")}
    texts = [v for k, v in obs.items() if k.startswith("annotation.")]
    if not texts:
        raise Gr00tError(f"the observation needs a language instruction ({LANGUAGE_KEY!r})")
    out[LANGUAGE_KEY] = [obs.get(LANGUAGE_KEY, texts[0])]
    return out


def to_libero_policy(obs: dict[str, Any], layout: LiberoDataConfig) -> dict[str, Any]:
    """What the OpenVLA-family (and debug) policies take: ``image``, ``wrist_image``, ``state``, ``instruction``.

    ``state`` is the ``state.*`` arrays concatenated in the layout's declared order (then any others by name).
    """
    videos = [k for k in obs if k.startswith("video.")]
    out: dict[str, Any] = {}
    main = "video.image" if "video.image" in obs else next((k for k in videos if k != "video.wrist_image"), None)
    if main is not None:
        out["image"] = obs[main][0]
    if "video.wrist_image" in obs:
        out["wrist_image"] = obs["video.wrist_image"][0]
    states = [k for k in layout.state_keys if k in obs]
    states += sorted(k for k in obs if k.startswith("state.") and k not in layout.state_keys)
    if states:
        out["state"] = np.concatenate([np.asarray(obs[k], dtype=np.float32).reshape(-1) for k in states])
    texts = [v for k, v in obs.items() if k.startswith("annotation.")]
    if texts:
        out["instruction"] = obs.get(LANGUAGE_KEY, texts[0])
    return out


def action_keys(layout: LiberoDataConfig, action_dim: int) -> dict[str, int]:
    """``action.<key> -> width`` for a chunk of ``action_dim`` (the layout's keys when the widths add up)."""
    if action_dim == layout.action_dim:
        return dict(layout.action_keys)
    return {"action.actions": action_dim}


def split_actions(actions: np.ndarray, keys: dict[str, int]) -> dict[str, np.ndarray]:
    """``[H, D]`` -> ``{"action.x": [H, 1], ...}`` in the declared order."""
    out, i = {}, 0
    for key, width in keys.items():
        out[key] = np.ascontiguousarray(actions[:, i:i + width], dtype=np.float32)
        i += width
    return out


def modality_config(layout: LiberoDataConfig, horizon: int, action_dim: int, fmt: str) -> dict[str, Any]:
    """The ``get_modality_config`` reply: one tagged ModalityConfig per modality, keys as ``get_action`` uses."""
    n16 = fmt == "n1.6"

    def bare(keys: list[str]) -> list[str]:
        return [k.split(".", 1)[1] for k in keys] if n16 else keys

    configs = {
        "video": {"delta_indices": [0], "modality_keys": bare(list(layout.video_keys))},
        "state": {"delta_indices": [0], "modality_keys": bare(list(layout.state_keys))},
        "action": {"delta_indices": list(range(horizon)),
                   "modality_keys": bare(list(action_keys(layout, action_dim)))},
        "language": {"delta_indices": [0], "modality_keys": [LANGUAGE_KEY]},
    }
    return {name: {MODALITY_TAG: True, "as_json": cfg if n16 else json.dumps(cfg)} for name, cfg in configs.items()}


# ---------------------------------------------------------------------------------------------- endpoints
Respond = Callable[[Any, "str | None", "str | None"], None]


class ServerCore(Protocol):
    """What the front end needs from :class:`server.app.PolicyServer`."""

    limits: wire.WireLimits
    policy: Any

    def readiness(self) -> str: ...
    def metadata(self) -> dict[str, Any]: ...
    def submit_observation(self, obs: dict[str, Any], client_key: bytes | str, respond: Respond) -> None: ...
    def submit_reset(self, done: Callable[[str | None], None]) -> None: ...
    def request_stop(self) -> None: ...
    def count(self, kind: str, error: str | None = None) -> None: ...


class Gr00tFrontEnd:
    """Answers GR00T-protocol requests with the server's policy, through its dynamic batcher.

    ``reply`` (given per message) sends one object back to that client; it is always called exactly once,
    possibly later (after inference), and always on the event loop.
    """

    def __init__(self, server: ServerCore, *, api_token: str | None = None, allow_kill: bool = False,
                 modality_format: str = "n1.5") -> None:
        self.server = server
        self.api_token = api_token
        self.allow_kill = allow_kill
        self.modality_format = modality_format

    def _layout(self) -> LiberoDataConfig:
        layout = getattr(self.server.policy, "data_config", None)
        return layout if isinstance(layout, LiberoDataConfig) else LiberoDataConfig()

    def _is_gr00t_policy(self) -> bool:
        return isinstance(getattr(self.server.policy, "data_config", None), LiberoDataConfig)

    def fail(self, reply: Callable[[Any], None], exc: Gr00tError, endpoint: str = "invalid") -> None:
        self.server.count(f"gr00t.{endpoint}", exc.code)
        logger.warning("GR00T-protocol %s request: %s", endpoint, exc.message)
        reply(error_reply(exc.message))

    def handle(self, message: Any, client_key: bytes, reply: Callable[[Any], None]) -> None:
        """Validate and answer one decoded message (errors are replies; nothing here raises)."""
        try:
            request = parse_request(message, self.server.limits, self.api_token)
        except Gr00tError as exc:
            self.fail(reply, exc)
            return
        endpoint = request.endpoint
        self.server.count(f"gr00t.{endpoint}")
        try:
            getattr(self, f"_{endpoint}")(request, client_key, reply)
        except Gr00tError as exc:
            self.fail(reply, exc, endpoint)
        except wire.WireError as exc:
            self.fail(reply, Gr00tError(exc.message, exc.code), endpoint)

    def _require_ready(self) -> None:
        state = self.server.readiness()
        if state != "ready":
            raise Gr00tError(f"the policy is {state}; retry once ping reports 'ready'", wire.ERR_LOADING)

    def _ping(self, request: Gr00tRequest, client_key: bytes, reply: Callable[[Any], None]) -> None:
        state = self.server.readiness()
        reply({"status": "ok" if state == "ready" else state, "readiness": state,
               "message": "Server is running" if state == "ready" else f"Server is {state}"})

    def _get_modality_config(self, request: Gr00tRequest, client_key: bytes, reply: Callable[[Any], None]) -> None:
        self._require_ready()
        meta = self.server.metadata()
        reply(modality_config(self._layout(), int(meta.get("action_horizon", 1)),
                              int(meta.get("action_dim", 7)), self.modality_format))

    def _reset(self, request: Gr00tRequest, client_key: bytes, reply: Callable[[Any], None]) -> None:
        self._require_ready()

        def done(error: str | None) -> None:
            reply(error_reply(error) if error is not None else {"status": "ok"})

        self.server.submit_reset(done)

    def _kill(self, request: Gr00tRequest, client_key: bytes, reply: Callable[[Any], None]) -> None:
        if not self.allow_kill:
            raise Gr00tError("the kill endpoint is disabled (start the server with --allow-kill)", ERR_FORBIDDEN)
        logger.warning("stopping on a GR00T-protocol kill request")
        reply({"status": "ok", "message": "Server is stopping"})
        self.server.request_stop()

    def _get_action(self, request: Gr00tRequest, client_key: bytes, reply: Callable[[Any], None]) -> None:
        self._require_ready()
        obs, form = flat_observation(request.data)
        obs = to_gr00t_policy(obs) if self._is_gr00t_policy() else to_libero_policy(obs, self._layout())
        wire.validate_observation(obs, self.server.limits)
        layout = self._layout()

        def respond(out: Any, code: str | None, message: str | None) -> None:
            if out is None:
                self.server.count("gr00t.get_action", code or wire.ERR_INTERNAL)
                reply(error_reply(f"[{code}] {message}"))
                return
            actions = np.asarray(out.actions, dtype=np.float32)
            split = split_actions(actions, action_keys(layout, actions.shape[-1]))
            if form == "n1.5":
                reply(split)
            else:
                reply([{k.split(".", 1)[1]: v[None] for k, v in split.items()}, dict(out.info)])

        self.server.submit_observation(obs, client_key, respond)
