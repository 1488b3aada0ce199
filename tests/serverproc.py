"""Start the real server as a subprocess on a free port, for end-to-end tests and benchmarks."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SERVER_PYTHON = os.environ.get("SERVER_PYTHON", str(REPO / ".venv" / "bin" / "python"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A running ``python -m server``; ``stop()`` sends SIGTERM and returns the exit code."""

    def __init__(self, args: Sequence[str] = (), env: dict[str, str] | None = None, port: int | None = None,
                 python: str | None = None, ready_timeout_s: float = 60.0, default_policy: bool = False) -> None:
        self.port = port or free_port()
        python = python or (SERVER_PYTHON if Path(SERVER_PYTHON).exists() else sys.executable)
        full_env = dict(os.environ)
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        args = list(args)
        if "--policy" not in args and not default_policy:
            # Tests check exact replies against the deterministic debugging policy; the embedded default
            # model (openvla-rsd) is exercised explicitly (default_policy=True or --policy openvla-rsd).
            args = ["--policy", "debug", *args]
        self.cmd = [python, "-m", "server", "--port", str(self.port), *args]
        if "--torch-threads" not in args and os.environ.get("SERVER_TORCH_THREADS", "1") != "0":
            # One thread: on a shared 2-core machine torch is much slower with more.
            self.cmd += ["--torch-threads", os.environ.get("SERVER_TORCH_THREADS", "1")]
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.stdout = ""
        self.stderr = ""
        self._wait_ready(ready_timeout_s)

    def _wait_ready(self, timeout_s: float) -> None:
        from client.policy_client import wait_until_serving

        if wait_until_serving(self.port, timeout_s=timeout_s, alive=lambda: self.proc.poll() is None):
            return
        if self.proc.poll() is not None:
            self.stdout, self.stderr = self.proc.communicate()
            raise RuntimeError(f"server exited with {self.proc.returncode}: {self.stderr[-3000:]}")
        self.kill()
        raise RuntimeError(f"server not ready after {timeout_s}s: {self.stderr[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            self.stdout, self.stderr = self.proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.stdout, self.stderr = self.proc.communicate()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.stop()
