"""openpi's own client, unchanged, drives a LIBERO episode against the embedded default server on ``--ws-port``.

Runs in .venv-libero with ``openpi-client`` (PyPI 0.1.2) installed: ``WebsocketClientPolicy`` connects, reads the
server's metadata, and sends observations under openpi's LIBERO example keys (``observation/image``,
``observation/wrist_image``, ``observation/state``, ``prompt``); the server (``.venv``, the shipped model) replies
``actions`` [H, 7] and ``server_timing``. The episode follows the evaluation protocol of client/libero/evaluate.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("libero.libero", reason="needs the LIBERO simulator (.venv-libero: scripts/setup.sh libero)")
# A hard import: scripts/setup.sh libero installs the real openpi-client, so a missing one is a failure, not a skip.
from openpi_client import websocket_client_policy  # noqa: E402

from client.libero.env import close_env, extract_obs, get_suite_tasks, make_env, reset_to_init  # noqa: E402
from client.libero.protocol import (  # noqa: E402
    ACTION_DIM,
    DEFAULT_SEED,
    NUM_WAIT_STEPS,
    WAIT_ACTION,
    convert_gripper,
)
from client.testing import SERVER_PYTHON, ServerProcess, free_port  # noqa: E402

pytestmark = pytest.mark.libero

MAX_STEPS = 16


def to_openpi_keys(obs: dict) -> dict:
    """Our LIBERO observation under the keys openpi's LIBERO example sends."""
    return {"observation/image": obs["image"], "observation/wrist_image": obs["wrist_image"],
            "observation/state": obs["state"], "prompt": obs["instruction"]}


@pytest.fixture(scope="module")
def server():
    assert Path(SERVER_PYTHON).exists(), f"{SERVER_PYTHON} is absent: create it with scripts/setup.sh server"
    ws_port = free_port()
    with ServerProcess(args=["--ws-port", str(ws_port)], default_policy=True, ready_timeout_s=300) as proc:
        proc.ws_port = ws_port
        yield proc


def test_openpi_client_runs_a_libero_episode(server: ServerProcess) -> None:
    policy = websocket_client_policy.WebsocketClientPolicy("127.0.0.1", server.ws_port)
    meta = policy.get_server_metadata()
    assert meta["status"] == "ready" and meta["action_dim"] == ACTION_DIM
    horizon = int(meta["action_horizon"])
    task = get_suite_tasks("libero_spatial")[0]
    env = make_env(task)
    try:
        raw = reset_to_init(env, task, 0, DEFAULT_SEED)
        for _ in range(NUM_WAIT_STEPS):
            raw, _, _, _ = env.step(WAIT_ACTION.astype(np.float64))
        steps, queries, queue = 0, 0, []
        while steps < MAX_STEPS:
            if not queue:
                reply = policy.infer(to_openpi_keys(extract_obs(raw, task.instruction)))
                queries += 1
                actions = reply["actions"]
                assert isinstance(actions, np.ndarray) and actions.shape == (horizon, ACTION_DIM)
                assert np.isfinite(actions).all() and reply["server_timing"]["infer_ms"] > 0
                queue = list(convert_gripper(actions, meta["gripper_convention"]))
            raw, _, done, _ = env.step(queue.pop(0).astype(np.float64))
            steps += 1
            if done:
                break
        assert steps >= 1 and queries >= 1
        assert queries >= min(MAX_STEPS, steps) // horizon

        # A bad observation comes back as openpi's client reports server errors; the connection goes on.
        bad = to_openpi_keys(extract_obs(raw, task.instruction))
        bad["observation/image"] = bad["observation/image"].astype(np.float32)
        with pytest.raises(RuntimeError, match="bad_request"):
            policy.infer(bad)
        again = policy.infer(to_openpi_keys(extract_obs(raw, task.instruction)))
        assert again["actions"].shape == (horizon, ACTION_DIM)
    finally:
        close_env(env)
        policy._ws.close()  # openpi's client has no public close
