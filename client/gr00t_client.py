"""A client for Isaac-GR00T's ZeroMQ policy protocol (numpy, msgpack, pyzmq only), written from its public spec.

Why here: the tests, the wire benchmark and the LIBERO evaluation drive our server exactly the way a GR00T user's
own client does (REQ socket, one msgpack frame, arrays as ``{"__ndarray_class__": True, "as_npy": <np.save>}``),
without importing Isaac-GR00T. Replies are decoded with ``np.load(..., allow_pickle=False)`` only.

* :class:`Gr00tClient` — ``ping``, ``get_modality_config``, ``get_action`` (N1.5 flat or N1.6 nested form),
  ``reset``, ``kill``; an ``{"error": ...}`` reply raises :class:`Gr00tServerError`;
* :func:`libero_gr00t_observation` — a LIBERO observation (``image``, ``wrist_image``, 8-D ``state``,
  ``instruction``) in GR00T's LIBERO modality keys; :func:`actions_from_reply` — the ``[H, 7]`` chunk back.
"""

from __future__ import annotations

import io
import json
from typing import Any

import msgpack
import numpy as np
import zmq

LANGUAGE_KEY = "annotation.human.action.task_description"
LIBERO_STATE_KEYS = {"state.x": 1, "state.y": 1, "state.z": 1, "state.roll": 1, "state.pitch": 1, "state.yaw": 1,
                     "state.gripper": 2}
LIBERO_ACTION_KEYS = ("action.x", "action.y", "action.z", "action.roll", "action.pitch", "action.yaw",
                      "action.gripper")


class Gr00tClientError(RuntimeError):
    """No reply within the timeout, or a reply that is not a GR00T-protocol message."""


class Gr00tServerError(Gr00tClientError):
    """The server answered ``{"error": message}``."""


NDARRAY_TAG = "__ndarray_class__"


def encode_ndarray(arr: np.ndarray) -> dict[str, Any]:
    """``arr`` as GR00T's tagged map (``np.save`` bytes, never pickled)."""
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return {NDARRAY_TAG: True, "as_npy": buf.getvalue()}


def _encode(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return encode_ndarray(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"cannot send a {type(obj).__name__} over the GR00T protocol")


def _decode(obj: dict[str, Any]) -> Any:
    if NDARRAY_TAG in obj:
        return np.load(io.BytesIO(obj["as_npy"]), allow_pickle=False)
    return obj


def packb(obj: Any) -> bytes:
    """Encode one GR00T-protocol message (the one encoder: the server's replies use it too)."""
    return msgpack.packb(obj, default=_encode, use_bin_type=True)


def unpackb(payload: bytes) -> Any:
    """Decode one GR00T-protocol message (arrays via ``np.load(allow_pickle=False)``)."""
    return msgpack.unpackb(payload, object_hook=_decode, raw=False)


class Gr00tClient:
    """One REQ socket to a server speaking the GR00T protocol; a timeout rebuilds the socket (REQ's lock-step)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 5555, timeout_s: float = 30.0,
                 api_token: str | None = None) -> None:
        self.endpoint = f"tcp://{host}:{port}"
        self.timeout_ms = int(timeout_s * 1000)
        self.api_token = api_token
        self._ctx = zmq.Context.instance()
        self._socket: zmq.Socket | None = None

    def _connect(self) -> zmq.Socket:
        if self._socket is None:
            sock = self._ctx.socket(zmq.REQ)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(self.endpoint)
            self._socket = sock
        return self._socket

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    def __enter__(self) -> Gr00tClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send_raw(self, payload: bytes) -> Any:
        """Send already-encoded bytes and return the decoded reply (for malformed-message tests)."""
        sock = self._connect()
        sock.send(payload)
        if not sock.poll(self.timeout_ms):
            self.close()
            raise Gr00tClientError(f"no reply from {self.endpoint} within {self.timeout_ms} ms")
        return unpackb(sock.recv())

    def call(self, endpoint: str, data: dict[str, Any] | None = None) -> Any:
        """Call ``endpoint``; an ``{"error": ...}`` reply raises :class:`Gr00tServerError`."""
        request: dict[str, Any] = {"endpoint": endpoint}
        if data is not None:
            request["data"] = data
        if self.api_token is not None:
            request["api_token"] = self.api_token
        reply = self.send_raw(packb(request))
        if isinstance(reply, dict) and "error" in reply:
            raise Gr00tServerError(str(reply["error"]))
        return reply

    # -- endpoints -----------------------------------------------------------------------------------------
    def ping(self) -> dict[str, Any]:
        return self.call("ping")

    def get_modality_config(self) -> dict[str, dict[str, Any]]:
        """``modality -> {"delta_indices": [...], "modality_keys": [...]}`` (as_json string or map)."""
        reply = self.call("get_modality_config")
        out = {}
        for name, cfg in reply.items():
            body = cfg["as_json"]
            out[name] = json.loads(body) if isinstance(body, str) else body
        return out

    def get_action(self, observation: dict[str, Any]) -> dict[str, np.ndarray]:
        """N1.5 form: the flat observation in, ``action.<key>`` arrays ``[H, d]`` out."""
        return self.call("get_action", observation)

    def get_action_n16(self, observation: dict[str, dict[str, Any]],
                       options: dict[str, Any] | None = None) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """N1.6 form: the nested observation (batch axis 1) in, ``(actions [1, H, d] by bare key, info)`` out."""
        actions, info = self.call("get_action", {"observation": observation, "options": options})
        return actions, info

    def reset(self) -> Any:
        return self.call("reset", {})

    def kill(self) -> Any:
        return self.call("kill")


def libero_gr00t_observation(image: np.ndarray, wrist_image: np.ndarray | None, state: np.ndarray,
                             instruction: str) -> dict[str, Any]:
    """A LIBERO observation in GR00T's LIBERO (N1.5, flat) keys: videos ``[1, H, W, 3]``, states ``[1, d]``."""
    obs: dict[str, Any] = {"video.image": np.asarray(image, dtype=np.uint8)[None]}
    if wrist_image is not None:
        obs["video.wrist_image"] = np.asarray(wrist_image, dtype=np.uint8)[None]
    state = np.asarray(state, dtype=np.float64).reshape(-1)
    i = 0
    for key, width in LIBERO_STATE_KEYS.items():
        obs[key] = state[None, i:i + width]
        i += width
    obs[LANGUAGE_KEY] = [instruction]
    return obs


def nested_observation(flat: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The N1.6 form of a flat observation: ``{"video": {"image": [1, T, H, W, 3]}, "state": ..., "language":
    ...}`` with a leading batch axis of 1."""
    out: dict[str, dict[str, Any]] = {"video": {}, "state": {}, "language": {}}
    for key, value in flat.items():
        modality, name = key.split(".", 1)
        if modality == "annotation":
            out["language"][key] = [list(value)]
        else:
            out[modality][name] = np.asarray(value)[None]
    return out


def actions_from_reply(reply: dict[str, np.ndarray], keys: tuple[str, ...] = LIBERO_ACTION_KEYS) -> np.ndarray:
    """``{"action.x": [H, 1], ...}`` (or bare keys ``[1, H, d]``) -> the float32 ``[H, sum d]`` chunk."""
    parts = []
    for key in keys:
        value = reply[key] if key in reply else reply[key.split(".", 1)[1]][0]
        parts.append(np.asarray(value, dtype=np.float32).reshape(np.asarray(value).shape[-2], -1))
    return np.concatenate(parts, axis=-1)


class Gr00tPolicyAdapter:
    """Our LIBERO evaluation's client interface (``metadata``, ``reset``, ``infer``) over the GR00T protocol.

    So :func:`client.libero.evaluate.run_episode` can drive any server that speaks Isaac-GR00T's protocol (ours
    included): ``metadata`` is derived from ``get_modality_config`` (horizon = the action ``delta_indices``),
    ``infer`` sends the LIBERO observation in GR00T's LIBERO keys and returns the ``[H, 7]`` chunk.
    """

    def __init__(self, client: Gr00tClient, gripper_convention: str = "libero") -> None:
        self.client = client
        self.gripper_convention = gripper_convention
        self.last_reply: dict[str, Any] = {}
        self._action_keys: tuple[str, ...] = LIBERO_ACTION_KEYS

    def metadata(self) -> dict[str, Any]:
        action = self.client.get_modality_config()["action"]
        keys = tuple(k if k.startswith("action.") else f"action.{k}" for k in action["modality_keys"])
        self._action_keys = keys
        return {"model_id": f"gr00t-protocol:{self.client.endpoint}", "action_horizon": len(action["delta_indices"]),
                "gripper_convention": self.gripper_convention}

    def reset(self) -> None:
        self.client.reset()

    def infer(self, obs: dict[str, Any]) -> np.ndarray:
        g_obs = libero_gr00t_observation(obs["image"], obs.get("wrist_image"), obs["state"], obs["instruction"])
        return actions_from_reply(self.client.get_action(g_obs), self._action_keys)

    def close(self) -> None:
        self.client.close()
