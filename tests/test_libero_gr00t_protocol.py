"""A full (short) LIBERO episode driven through Isaac-GR00T's protocol against the embedded default server.

The server is ``python -m server`` from .venv with its embedded default model (openvla-rsd), the client the real
headless LIBERO episode loop of ``client.libero.evaluate`` in .venv-libero, talking GR00T's protocol (REQ,
``__ndarray_class__`` arrays, ``action.*`` replies) through :class:`client.gr00t_client.Gr00tPolicyAdapter`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("libero.libero", reason="needs the LIBERO simulator (.venv-libero: scripts/setup.sh libero)")

from client.gr00t_client import Gr00tClient, Gr00tPolicyAdapter  # noqa: E402
from client.libero.config import config_from_args  # noqa: E402
from client.libero.evaluate import run_episode  # noqa: E402
from client.policy_client import PolicyClient  # noqa: E402
from client.testing import SERVER_PYTHON, ServerProcess  # noqa: E402

pytestmark = pytest.mark.libero


def test_libero_episode_over_gr00t_protocol(tmp_path: Path) -> None:
    from client.libero.env import close_env, get_suite_tasks, make_env, setup_headless_gl, write_libero_config

    assert Path(SERVER_PYTHON).exists(), f"{SERVER_PYTHON} is absent: create it with scripts/setup.sh server"
    cfg = config_from_args(["libero_spatial", "--headless", "--tasks", "0", "--trials", "1", "--max-steps", "12",
                            "--results", str(tmp_path / "results.json"), "--no-progress"])
    setup_headless_gl()
    write_libero_config()
    task = get_suite_tasks(cfg.suite)[0]
    with ServerProcess(default_policy=True, ready_timeout_s=300) as server:
        with PolicyClient(port=server.port, timeout_s=60) as ours:
            meta = ours.metadata()
        adapter = Gr00tPolicyAdapter(Gr00tClient(port=server.port, timeout_s=120))
        env = make_env(task, cfg.resolution, cameras=True)
        try:
            ep, _ = run_episode(env, task, 0, cfg, adapter, {})
        finally:
            close_env(env)
            adapter.close()
        with PolicyClient(port=server.port, timeout_s=60) as ours:
            stats = ours.stats()
    assert meta["policy"] == "openvla-rsd"
    assert not ep.errored and ep.error is None, ep
    assert ep.steps == 12 or ep.success
    assert ep.num_queries >= 1 and ep.latency_ms_p50 is not None and np.isfinite(ep.latency_ms_p50)
    assert stats["requests"]["gr00t.get_action"] == ep.num_queries
    assert stats["requests"]["gr00t.reset"] == 1 and stats["requests"]["gr00t.get_modality_config"] == 1
