"""The one testing helper shared by tests, benchmarks and scripts: a real server process and LIBERO-like inputs.

Why here, in the client layer: tests, benchmarks and scripts all sit above ``client`` and must not import from
``tests/``; and the helper has to work in ``.venv-libero`` (no torch), where the LIBERO end-to-end tests start a
``.venv`` server from the client side. It starts ``python -m server`` as a subprocess (the same command a user
runs), never imports the server.

* :func:`free_port` — a TCP port nobody listens on right now;
* :class:`ServerProcess` — ``python -m server`` on a free port, ready when its ping says ``"status": "ready"``
  (:func:`client.policy_client.wait_until_serving`; it answers ping while still loading), stopped with SIGTERM,
  its output captured;
* :func:`libero_observation` — the LIBERO observation a client sends (two uint8 images, 8-D state, instruction).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np

logger = logging.getLogger(__name__)

#: The instruction of LIBERO-spatial task 0, used wherever an observation needs a realistic sentence.
DEFAULT_INSTRUCTION = "pick up the black bowl between the plate and the ramekin and place it on the plate"


def _find_repo_root() -> Path:
    """The checkout this package belongs to: the first parent of this file (else of the cwd) with the project's
    ``pyproject.toml`` and ``server/`` package. ``VLA_REPO_ROOT`` overrides (a non-editable install)."""
    env = os.environ.get("VLA_REPO_ROOT")
    if env:
        return Path(env).resolve()
    for start in (Path(__file__).resolve().parent, Path.cwd().resolve()):
        for d in (start, *start.parents):
            if (d / "pyproject.toml").is_file() and (d / "server" / "__main__.py").is_file():
                return d
    return Path(__file__).resolve().parents[1]


REPO: Path = _find_repo_root()
#: The interpreter meant to run the server: ``SERVER_PYTHON``, else the repository's ``.venv`` (which may not
#: exist yet; :func:`server_python` falls back to the current interpreter).
SERVER_PYTHON: str = os.environ.get("SERVER_PYTHON", str(REPO / ".venv" / "bin" / "python"))


def server_python() -> str:
    """:data:`SERVER_PYTHON` when it exists, else ``sys.executable`` (set-up not done: run in this venv)."""
    return SERVER_PYTHON if Path(SERVER_PYTHON).exists() else sys.executable


def venv_python(venv: str) -> str:
    """``<repo>/<venv>/bin/python`` when that environment exists, else the current interpreter."""
    p = REPO / venv / "bin" / "python"
    return str(p) if p.exists() else sys.executable


def free_port() -> int:
    """A loopback TCP port free at the time of the call (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _default_torch_threads() -> int | None:
    # One thread by default: on a shared 2-core machine torch is much slower with more. SERVER_TORCH_THREADS=0
    # leaves the server's own choice.
    value = int(os.environ.get("SERVER_TORCH_THREADS", "1"))
    return value or None


class ServerProcess:
    """A running ``python -m server`` on ``port`` (a free one by default).

    Args:
        args: server flags. Without ``--policy`` the deterministic debugging policy is chosen (tests check exact
            replies against it) unless ``default_policy`` is true (the server's embedded default model).
        env: variables added to (or, with ``inherit_env=False``, replacing) the environment.
        drop_env_prefixes: inherited variables with these prefixes are removed before ``env`` is applied (e.g.
            ``("GR00T_DUQUANT_",)`` so a caller's quantisation settings do not leak into a full-precision server).
        python: the server interpreter (default :func:`server_python`).
        torch_threads: ``--torch-threads`` added unless ``args`` has it; ``"auto"``: ``SERVER_TORCH_THREADS``
            (default 1, 0 = the server's choice); ``None``: never added.
        log_path: write the server's stdout and stderr to this file (kept) instead of capturing them.
        wait: wait until it serves before returning (``False``: call :meth:`wait_ready` yourself, e.g. to start
            several servers and let them load at the same time).

    After :meth:`stop` or :meth:`kill`, ``stdout`` and ``stderr`` hold what the server printed (with
    ``log_path``, both are the log file's text). Output goes to files, not pipes, so a chatty server never
    blocks on a full pipe.
    """

    def __init__(self, args: Sequence[str] = (), env: Mapping[str, str] | None = None, port: int | None = None,
                 python: str | None = None, ready_timeout_s: float = 60.0, default_policy: bool = False,
                 *, drop_env_prefixes: Sequence[str] = (), torch_threads: int | str | None = "auto",
                 log_path: str | Path | None = None, wait: bool = True) -> None:
        self.port = port or free_port()
        self.python = python or server_python()
        args = list(args)
        if "--policy" not in args and not default_policy:
            args = ["--policy", "debug", *args]
        threads = _default_torch_threads() if torch_threads == "auto" else torch_threads
        if threads is not None and "--torch-threads" not in args:
            args += ["--torch-threads", str(threads)]
        self.cmd = [self.python, "-m", "server", "--port", str(self.port), *args]
        full_env = {k: v for k, v in os.environ.items() if not any(k.startswith(p) for p in drop_env_prefixes)}
        full_env.update(env or {})
        full_env.setdefault("PYTHONUNBUFFERED", "1")
        self.log_path = Path(log_path) if log_path is not None else None
        self._out: IO[Any]
        self._err: IO[Any]
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._out = self._err = open(self.log_path, "w+")  # noqa: SIM115 - closed in _collect()
            stderr: Any = subprocess.STDOUT
        else:
            self._out = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in _collect()
            self._err = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed in _collect()
            stderr = self._err
        self.stdout = ""
        self.stderr = ""
        self._collected = False
        logger.debug("starting %s", " ".join(self.cmd))
        self.proc = subprocess.Popen(self.cmd, cwd=REPO, env=full_env, stdout=self._out, stderr=stderr, text=True)
        if wait:
            self.wait_ready(ready_timeout_s)

    # -- lifecycle -----------------------------------------------------------------------------------------
    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Return once the server's ping reports ``"status": "ready"`` (policy loaded); raise ``RuntimeError``
        (with its output) if it exits or is still not ready after ``timeout_s`` (it is then killed)."""
        from client.policy_client import wait_until_serving

        if wait_until_serving(self.port, timeout_s=timeout_s, alive=self.alive):
            return
        if not self.alive():
            self.proc.wait()
            self._collect()
            raise RuntimeError(f"server exited with {self.proc.returncode}: {self._tail()}")
        self.kill()
        raise RuntimeError(f"server not ready after {timeout_s:.0f}s: {self._tail()}")

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 30.0) -> int:
        """Send ``sig`` (SIGTERM: a clean shutdown), wait up to ``timeout_s`` (then kill); return the exit code."""
        if self.alive():
            self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._collect()
        return self.proc.returncode

    def kill(self) -> None:
        if self.alive():
            self.proc.kill()
        self.proc.wait()
        self._collect()

    def output(self) -> str:
        """Everything the server printed so far (stdout then stderr), readable while it runs."""
        if self._collected:
            return self.stdout + ("" if self.log_path is not None else self.stderr)
        return "".join(_read_all(f) for f in dict.fromkeys((self._out, self._err)))

    def _collect(self) -> None:
        if self._collected:
            return
        files = (self._out,) if self.log_path is not None else (self._out, self._err)
        texts = [_read_all(f) for f in files]
        for f in files:
            f.close()
        self.stdout = texts[0]
        self.stderr = texts[-1]
        self._collected = True

    def _tail(self, n: int = 3000) -> str:
        where = f" (log: {self.log_path})" if self.log_path is not None else ""
        return self.output()[-n:] + where

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.alive():
            self.stop()
        else:
            self._collect()


def _read_all(f: IO[Any]) -> str:
    # pread, not seek + read: the child shares this file's offset, and moving it would misplace its writes.
    fd = f.fileno()
    return os.pread(fd, os.fstat(fd).st_size, 0).decode("utf-8", errors="replace")


def libero_observation(seed: int = 0, size: int = 256, instruction: str = DEFAULT_INSTRUCTION, *,
                       wrist: bool = True, state_dim: int = 8) -> dict[str, Any]:
    """A LIBERO-like observation as a client sends it: random uint8 ``image`` (and ``wrist_image``) of
    ``size`` x ``size`` x 3, a standard-normal float32 ``state`` and the ``instruction``; the same ``seed`` gives
    the same arrays."""
    rng = np.random.default_rng(seed)
    obs: dict[str, Any] = {"image": rng.integers(0, 255, (size, size, 3), dtype=np.uint8)}
    if wrist:
        obs["wrist_image"] = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    obs["state"] = rng.standard_normal(state_dim).astype(np.float32)
    obs["instruction"] = instruction
    return obs
