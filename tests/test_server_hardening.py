"""Hostile input against the real process, CURVE authentication, and a no-unsafe-deserialisation lint."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from client.policy_client import PolicyClient, PolicyTimeoutError
from client.testing import REPO, ServerProcess, free_port, server_python
from server.policies.debug import expected_debug_actions


def test_fuzz_script_against_real_server() -> None:
    result = subprocess.run([sys.executable, "scripts/fuzz_server.py", "--messages", "1500", "--good-requests", "50"],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.returncode == 0, result.stdout + result.stderr
    assert summary["messages_sent"] == 1500
    # Every malformed message was answered with an error or (bad frame count) dropped.
    assert summary["error_replies"] + summary["server_dropped_frames"] == 1500
    assert summary["good_failed"] == 0 and summary["good_ok"] >= 50
    assert summary["server_alive_after"] and not summary["traceback_in_server_log"]


def test_curve_authorised_client_served_unauthorised_gets_nothing(tmp_path: Path) -> None:
    import zmq.auth

    from server.keys import generate

    keys = tmp_path / "keys"
    generate(str(keys), ["alice"])
    zmq.auth.create_certificates(str(tmp_path), "mallory")  # a key pair the server never authorised
    server_public, _ = zmq.auth.load_certificate(str(keys / "server.key"))
    alice = zmq.auth.load_certificate(str(keys / "clients" / "alice.key_secret"))
    mallory = zmq.auth.load_certificate(str(tmp_path / "mallory.key_secret"))
    obs = {"state": np.ones(8, np.float32), "instruction": "x"}
    with _curve_server(keys) as port:
        good = PolicyClient(port=port, timeout_s=5, curve_server_key=server_public, curve_client_keys=alice)
        np.testing.assert_allclose(good.infer(obs), expected_debug_actions(obs), atol=1e-6)
        good.close()
        for kwargs in ({"curve_server_key": server_public, "curve_client_keys": mallory}, {}):
            intruder = PolicyClient(port=port, timeout_s=1.0, **kwargs)
            with pytest.raises(PolicyTimeoutError):
                intruder.infer(obs)
            intruder.close()


class _curve_server:
    """A CURVE server: readiness is checked with an authorised client instead of a plain ping."""

    def __init__(self, keys: Path) -> None:
        import os
        import time

        import zmq.auth
        self.port = free_port()
        python = server_python()
        self.proc = subprocess.Popen([python, "-m", "server", "--port", str(self.port), "--policy", "debug",
                                      "--curve-keys", str(keys)],
                                     cwd=REPO, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        server_public, _ = zmq.auth.load_certificate(str(keys / "server.key"))
        alice = zmq.auth.load_certificate(str(keys / "clients" / "alice.key_secret"))
        client = PolicyClient(port=self.port, timeout_s=0.5, curve_server_key=server_public, curve_client_keys=alice)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.communicate()[1]
            try:
                client.ping()
                break
            except PolicyTimeoutError:
                continue
        client.close()

    def __enter__(self) -> int:
        return self.port

    def __exit__(self, *exc: object) -> None:
        self.proc.terminate()
        _, err = self.proc.communicate(timeout=30)
        assert self.proc.returncode == 0, err
        assert "CURVE enabled" in err


def test_curve_keys_dir_validated_at_startup(tmp_path: Path) -> None:
    python = server_python()
    result = subprocess.run([python, "-m", "server", "--policy", "debug", "--curve-keys", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--curve-keys" in result.stderr and "server.key_secret" in result.stderr


def test_public_bind_without_auth_warns() -> None:
    with ServerProcess(args=["--host", "0.0.0.0"]) as proc:
        pass
    assert "without authentication" in proc.stderr


UNSAFE = [
    (re.compile(r"\bpickle\.loads?\b|\bcPickle\b|\bdill\b|\bmarshal\.loads\b"), "unpickling"),
    (re.compile(r"\btorch\.load\((?![^)]*weights_only\s*=\s*True)"), "torch.load without weights_only=True"),
    (re.compile(r"(?<![\w.])(eval|exec)\("), "eval/exec"),
    (re.compile(r"allow_pickle\s*=\s*True"), "np.load with allow_pickle=True"),
]


def test_no_unsafe_deserialisation_in_shipped_code() -> None:
    offenders = []
    for folder in ("server", "client", "quant", "rsd", "models", "scripts", "benchmarks"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text(encoding="utf-8")
            for pattern, what in UNSAFE:
                for m in pattern.finditer(text):
                    line = text.count("\n", 0, m.start()) + 1
                    offenders.append(f"{path.relative_to(REPO)}:{line}: {what}")
    assert offenders == []


def test_structured_request_log_lines() -> None:
    with ServerProcess(args=["--log-requests"]) as proc, PolicyClient(port=proc.port, timeout_s=10) as client:
        client.infer({"state": np.ones(8, np.float32), "instruction": "x"})
        stats = client.stats()
    line = next(ln for ln in proc.stderr.splitlines() if "infer request_id=" in ln)
    for key in ("client=", "batch_size=1", "queue_ms=", "infer_ms=", "server_ms="):
        assert key in line
    assert stats["requests"]["infer"] == 1 and stats["infer_latency"]["count"] == 1
