"""Isaac-GR00T's ZeroMQ protocol on the main port, beside ours, and readiness vs liveness.

The GR00T side is driven by :class:`client.gr00t_client.Gr00tClient`, written from the protocol's public
description (REQ socket, msgpack, ``__ndarray_class__`` arrays), the way a GR00T user's client talks.
"""

from __future__ import annotations

import io
import json
import pickle
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest

from client import wire
from client.gr00t_client import (
    LANGUAGE_KEY,
    LIBERO_ACTION_KEYS,
    Gr00tClient,
    Gr00tServerError,
    actions_from_reply,
    libero_gr00t_observation,
    nested_observation,
    packb,
)
from client.policy_client import PolicyClient, PolicyServerError
from client.testing import REPO, ServerProcess, libero_observation

SHIPPED_GR00T = REPO / "models" / "checkpoints" / "gr00t-n1.5-tiny-libero-spatial"


def gr00t_obs(seed: int = 0, size: int = 64) -> tuple[dict, dict]:
    """The same LIBERO observation in our keys and in GR00T's flat (N1.5) keys."""
    obs = libero_observation(seed, size=size)
    return obs, libero_gr00t_observation(obs["image"], obs["wrist_image"], obs["state"], obs["instruction"])


def npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


@pytest.fixture(scope="module")
def debug_server():
    with ServerProcess(["--policy", "debug"]) as proc:
        yield proc


def test_ping_and_modality_config(debug_server) -> None:
    with Gr00tClient(port=debug_server.port, timeout_s=10) as g:
        assert g.ping()["status"] == "ok" and g.ping()["readiness"] == "ready"
        cfg = g.get_modality_config()
    assert cfg["video"]["modality_keys"] == ["video.image", "video.wrist_image"]
    assert cfg["state"]["modality_keys"] == ["state.x", "state.y", "state.z", "state.roll", "state.pitch",
                                             "state.yaw", "state.gripper"]
    assert cfg["action"]["modality_keys"] == list(LIBERO_ACTION_KEYS)
    assert cfg["action"]["delta_indices"] == list(range(8))  # the debug policy's horizon
    assert cfg["language"]["modality_keys"] == [LANGUAGE_KEY]


def test_get_action_n15_and_n16_match_our_protocol(debug_server) -> None:
    ours, theirs = gr00t_obs(3)
    with PolicyClient(port=debug_server.port, timeout_s=10) as c, Gr00tClient(port=debug_server.port) as g:
        expected = c.infer(ours)
        reply = g.get_action(theirs)
        actions16, info = g.get_action_n16(nested_observation(theirs), options={"seed": 1})
        assert c.stats()["requests"]["gr00t.get_action"] >= 2
    assert sorted(reply) == sorted(LIBERO_ACTION_KEYS)
    assert all(v.shape == (8, 1) and v.dtype == np.float32 for v in reply.values())
    np.testing.assert_array_equal(actions_from_reply(reply), expected)
    assert sorted(actions16) == sorted(k.split(".", 1)[1] for k in LIBERO_ACTION_KEYS)
    assert all(v.shape == (1, 8, 1) for v in actions16.values()) and isinstance(info, dict)
    np.testing.assert_array_equal(actions_from_reply(actions16), expected)


def test_history_and_reset(debug_server) -> None:
    ours, theirs = gr00t_obs(4)
    # A two-step history: the last step is what the policy sees.
    theirs = {k: (np.concatenate([np.zeros_like(v), v]) if isinstance(v, np.ndarray) else v)
              for k, v in theirs.items()}
    with PolicyClient(port=debug_server.port, timeout_s=10) as c, Gr00tClient(port=debug_server.port) as g:
        np.testing.assert_array_equal(actions_from_reply(g.get_action(theirs)), c.infer(ours))
        assert g.reset() == {"status": "ok"}


def test_kill_refused_without_allow_kill(debug_server) -> None:
    with Gr00tClient(port=debug_server.port, timeout_s=10) as g:
        with pytest.raises(Gr00tServerError, match="allow-kill"):
            g.kill()
        assert g.ping()["status"] == "ok"
    assert debug_server.alive()


def _bad_messages() -> dict[str, bytes]:
    image = np.zeros((1, 8, 8, 3), np.uint8)
    good_npy = npy(image)

    def get_action(data) -> bytes:
        return msgpack.packb({"endpoint": "get_action", "data": data}, use_bin_type=True)

    def with_image(as_npy) -> bytes:
        return get_action({"video.image": {"__ndarray_class__": True, "as_npy": as_npy},
                           "state.x": {"__ndarray_class__": True, "as_npy": npy(np.zeros((1, 1)))},
                           LANGUAGE_KEY: ["go"]})

    huge = io.BytesIO()  # a valid header that claims 30 GB, followed by a few bytes
    np.lib.format.write_array_header_1_0(huge, {"descr": "|u1", "fortran_order": False, "shape": (99999, 99999, 3)})
    return {
        "not msgpack": b"\xc1\xc1\xc1",
        "not a map": msgpack.packb([1, 2, 3]),
        "unknown endpoint": msgpack.packb({"endpoint": "format_disk"}),
        "endpoint not a string": msgpack.packb({"endpoint": 5}),
        "data not a map": msgpack.packb({"endpoint": "get_action", "data": [1, 2]}),
        "bad ndarray header": with_image(b"\x93NUMPY\x01\x00\xff\xffgarbage"),
        "not npy at all": with_image(b"junk"),
        "as_npy not bytes": with_image("a string"),
        "object dtype": with_image(npy(np.array([{"a": 1}], dtype=object), allow_pickle=True)),
        "pickle bytes": with_image(pickle.dumps(image)),
        "structured dtype": with_image(npy(np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")]))),
        "oversize declared shape": with_image(huge.getvalue() + b"\0" * 64),
        "truncated array": with_image(good_npy[:-10]),
        "extra ndarray keys": get_action({"video.image": {"__ndarray_class__": True, "as_npy": good_npy,
                                                          "x": 1}}),
        "image wrong dtype": get_action({"video.image": {"__ndarray_class__": True,
                                                         "as_npy": npy(image.astype(np.float32))},
                                         LANGUAGE_KEY: ["go"]}),
        "image not an array": get_action({"video.image": "an image", LANGUAGE_KEY: ["go"]}),
        "state a string": get_action({"video.image": {"__ndarray_class__": True, "as_npy": good_npy},
                                      "state.x": "zero", LANGUAGE_KEY: ["go"]}),
        "instruction a number": get_action({"video.image": {"__ndarray_class__": True, "as_npy": good_npy},
                                            LANGUAGE_KEY: 7}),
        "unknown key": get_action({"video.image": {"__ndarray_class__": True, "as_npy": good_npy},
                                   "secret": 1, LANGUAGE_KEY: ["go"]}),
        "n1.6 batch of 2": get_action({"observation": {"video": {"image": {
            "__ndarray_class__": True, "as_npy": npy(np.zeros((2, 1, 8, 8, 3), np.uint8))}},
            "language": {LANGUAGE_KEY: [["a"], ["b"]]}}}),
        "our ext array inside": wire.packb({"endpoint": "get_action", "data": {"video.image": image}}),
        "non-finite state": get_action({"video.image": {"__ndarray_class__": True, "as_npy": good_npy},
                                        "state.x": {"__ndarray_class__": True,
                                                    "as_npy": npy(np.full((1, 1), np.nan))},
                                        LANGUAGE_KEY: ["go"]}),
    }


@pytest.mark.parametrize("name", sorted(_bad_messages()))
def test_malformed_messages_get_error_replies_and_serving_continues(debug_server, name: str) -> None:
    ours, theirs = gr00t_obs(5)
    with Gr00tClient(port=debug_server.port, timeout_s=10) as g:
        reply = g.send_raw(_bad_messages()[name])
        assert isinstance(reply, dict) and isinstance(reply.get("error"), (str, dict)), reply
        assert len(g.get_action(theirs)) == len(LIBERO_ACTION_KEYS)  # a later good request is answered
    assert debug_server.alive()


def test_both_protocols_interleaved_on_one_port(debug_server) -> None:
    ours, theirs = gr00t_obs(6)
    with PolicyClient(port=debug_server.port, timeout_s=10) as c, Gr00tClient(port=debug_server.port) as g:
        for _ in range(3):
            a = c.infer(ours)
            b = actions_from_reply(g.get_action(theirs))
            np.testing.assert_array_equal(a, b)
        assert c.ping()["status"] == "ready" and c.metadata()["status"] == "ready"


def test_api_token_checked() -> None:
    with ServerProcess(["--api-token", "s3cret"]) as proc:
        _, theirs = gr00t_obs(7)
        for token in (None, "wrong", "s3cre"):
            with Gr00tClient(port=proc.port, timeout_s=10, api_token=token) as g, \
                    pytest.raises(Gr00tServerError, match="Unauthorized"):
                g.get_action(theirs)
        with Gr00tClient(port=proc.port, timeout_s=10, api_token="s3cret") as g:
            assert g.ping()["status"] == "ok" and len(g.get_action(theirs)) == 7
        with PolicyClient(port=proc.port, timeout_s=10) as c:  # the token guards the GR00T protocol only
            assert c.ping()["status"] == "ready"
        assert "--api-token guards the GR00T protocol only" in proc.output()  # and start-up says so


def test_api_token_with_gr00t_protocol_only_has_no_warning() -> None:
    with ServerProcess(["--api-token", "s3cret", "--protocol", "gr00t"], wait=False) as proc, \
            Gr00tClient(port=proc.port, timeout_s=10, api_token="s3cret") as g:
        deadline = time.monotonic() + 60
        while g.ping().get("status") != "ok" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert "guards the GR00T protocol only" not in proc.output()


def test_kill_accepted_with_allow_kill() -> None:
    proc = ServerProcess(["--allow-kill"])
    try:
        with Gr00tClient(port=proc.port, timeout_s=10) as g:
            assert g.kill()["status"] == "ok"
        assert proc.proc.wait(timeout=30) == 0
    finally:
        proc.stop()


def test_protocol_vla_refuses_gr00t_and_gr00t_refuses_ours() -> None:
    with ServerProcess(["--protocol", "vla"]) as proc, Gr00tClient(port=proc.port, timeout_s=10) as g:
        reply = g.send_raw(packb({"endpoint": "ping"}))
        assert reply["ok"] is False and reply["error"]["code"] == wire.ERR_BAD_REQUEST
    with ServerProcess(["--protocol", "gr00t"], wait=False) as proc:
        with Gr00tClient(port=proc.port, timeout_s=10) as g:
            deadline = time.monotonic() + 30
            while g.ping().get("readiness") != "ready":
                assert time.monotonic() < deadline
                time.sleep(0.1)
            reply = g.send_raw(msgpack.packb(wire.make_request("ping", 1)))
            assert set(reply) == {"error"} and isinstance(reply["error"], str)
            assert len(g.get_action(gr00t_obs(8)[1])) == 7


def test_readiness_loading_then_ready() -> None:
    with ServerProcess(env={"VLA_TESTING_LOAD_DELAY_S": "4"}, wait=False) as proc:
        ours, theirs = gr00t_obs(9)
        with PolicyClient(port=proc.port, timeout_s=1, connect_retries=20) as c, \
                Gr00tClient(port=proc.port, timeout_s=5) as g:
            ping = c.ping()
            assert ping["status"] == "loading" and ping["protocol"] == wire.PROTOCOL_VERSION
            assert c.metadata()["status"] == "loading"
            with pytest.raises(PolicyServerError) as err:
                c.infer(ours)
            assert err.value.code == wire.ERR_LOADING
            assert g.ping()["status"] == "loading"
            with pytest.raises(Gr00tServerError, match="loading"):
                g.get_action(theirs)
            proc.wait_ready(60)
            assert c.ping()["status"] == "ready" and g.ping()["status"] == "ok"
            assert c.infer(ours).shape == (8, 7)


def test_bad_flags_exit_2_before_binding() -> None:
    proc = ServerProcess(["--policy-option", "no_such_option=1"], wait=False)
    assert proc.proc.wait(timeout=60) == 2
    proc.stop()
    assert "no_such_option" in proc.stderr


def test_load_failure_exits_2_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{not json")
    proc = ServerProcess(["--policy", "openvla", "--model-path", str(tmp_path)], wait=False)
    assert proc.proc.wait(timeout=120) == 2
    proc.stop()
    lines = [line for line in proc.stderr.splitlines() if line.startswith("python -m server: error:")]
    assert len(lines) == 1 and "--model-path" in lines[0] and "Traceback" not in proc.stderr


def _check_chunk_replies(port: int, horizon: int) -> None:
    _, theirs = gr00t_obs(10, size=128)
    with Gr00tClient(port=port, timeout_s=120) as g:
        cfg = g.get_modality_config()
        assert cfg["action"]["delta_indices"] == list(range(horizon))
        reply = g.get_action(theirs)
        assert sorted(k.split(".", 1)[-1] for k in reply) == sorted(
            k.split(".", 1)[-1] for k in cfg["action"]["modality_keys"])
        assert all(v.shape == (horizon, 1) and np.isfinite(v).all() for v in reply.values())
        actions16, info = g.get_action_n16(nested_observation(theirs))
        assert all(v.shape == (1, horizon, 1) for v in actions16.values()) and isinstance(info, dict)
        assert g.reset() == {"status": "ok"}


def test_embedded_default_policy_over_gr00t_protocol() -> None:
    with ServerProcess(default_policy=True, ready_timeout_s=300) as proc:
        with PolicyClient(port=proc.port, timeout_s=120) as c:
            meta = c.metadata()
        assert meta["policy"] == "openvla-rsd"
        _check_chunk_replies(proc.port, int(meta["action_horizon"]))


def test_shipped_gr00t_over_gr00t_protocol() -> None:
    args = ["--policy", "gr00t", "--model-path", str(SHIPPED_GR00T), "--denoising-steps", "4",
            "--gr00t-api", "n1.6"]
    with ServerProcess(args, ready_timeout_s=300) as proc:
        _check_chunk_replies(proc.port, 16)
        with Gr00tClient(port=proc.port, timeout_s=120) as g:
            raw = g.call("get_modality_config")
        assert isinstance(raw["action"]["as_json"], dict)  # N1.6: a map, bare keys
        assert raw["action"]["as_json"]["modality_keys"][0] == "x"
        json.dumps(raw["action"]["as_json"])


def test_non_string_keys_in_a_nested_observation_get_an_error_reply() -> None:
    """A REQ client waits for exactly one reply: a hostile key must become an error reply, not an exception."""
    from server.gr00t_protocol import Gr00tFrontEnd

    class Core:
        limits = wire.DEFAULT_LIMITS
        policy = None

        def readiness(self) -> str:
            return "ready"

        def count(self, kind: str, error: str | None = None) -> None:
            pass

        def submit_observation(self, obs, client_key, respond) -> None:
            raise AssertionError("an invalid observation reached the batcher")

    for group in ({"state": {b"x": 1}}, {"video": {b"image": 1}}, {"language": {b"task": "x"}}):
        replies: list = []
        message = wire.unpackb(msgpack.packb({"endpoint": "get_action", "data": {"observation": group}},
                                             use_bin_type=True))
        Gr00tFrontEnd(Core()).handle(message, b"peer", replies.append)
        assert len(replies) == 1 and isinstance(replies[0].get("error"), str), replies
