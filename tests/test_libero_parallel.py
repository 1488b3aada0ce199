"""Parallel LIBERO evaluation (client/libero/parallel.py): ``--workers N`` processes and ``--ray``.

A real server process (the deterministic debug policy, .venv) and the real headless simulator (.venv-libero, this
interpreter), with tiny episodes (a few steps at 64x64) so each test stays well under a minute on two busy cores.
Killed workers come from test hooks (``VLA_EVAL_TEST_HOOK_*``) that make a worker exit hard holding an episode.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("libero.libero", reason="needs the LIBERO simulator (.venv-libero: scripts/setup.sh libero)")

from client.libero.parallel import TEST_HOOK_EXIT_WORKER, TEST_HOOK_RAY_KILL_ONCE  # noqa: E402
from client.testing import REPO, SERVER_PYTHON, ServerProcess  # noqa: E402

pytestmark = pytest.mark.libero

TINY = ["--max-steps", "6", "--resolution", "64", "--no-video", "--no-progress", "--headless"]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.setdefault("MUJOCO_GL", "egl")
    env.update(extra)
    return env


def _evaluate(args: list[str], env: dict[str, str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "client.libero.evaluate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env or _env())


@pytest.fixture(scope="module")
def server():
    assert Path(SERVER_PYTHON).exists(), f"{SERVER_PYTHON} is absent: create it with scripts/setup.sh server"
    with ServerProcess() as s:
        yield s


def _base(server, results: Path, tasks: str = "0,1", trials: int = 1) -> list[str]:
    return ["libero_spatial", "--port", str(server.port), "--tasks", tasks, "--trials", str(trials),
            "--results", str(results), *TINY]


def _outcomes(doc: dict) -> list[tuple]:
    return [(e["task_id"], e["trial"], e["success"], e["errored"], e["steps"], e["num_queries"])
            for e in doc["episodes"]]


def test_two_workers_match_one_worker(server, tmp_path):
    one, two = tmp_path / "w1.json", tmp_path / "w2.json"
    r1 = _evaluate([*_base(server, one), "--workers", "1"])
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = _evaluate([*_base(server, two), "--workers", "2"])
    assert r2.returncode == 0, r2.stderr[-3000:]
    d1, d2 = json.loads(one.read_text()), json.loads(two.read_text())
    assert _outcomes(d1) == _outcomes(d2) and len(d2["episodes"]) == 2
    assert not any(e["errored"] for e in d2["episodes"])
    for key in ("summary", "per_task"):
        assert d1[key] == d2[key]
    assert set(d1) == set(d2) and "retries" not in d2  # same schema; no retry happened
    assert d2["config"]["workers"] == 2 and "worker 1 started" in r2.stderr


def test_killed_worker_episode_is_retried_once_on_another_worker(server, tmp_path):
    res = tmp_path / "killed.json"
    r = _evaluate([*_base(server, res), "--workers", "2"], env=_env(**{TEST_HOOK_EXIT_WORKER: "0"}))
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(res.read_text())
    keys = [(e["task_id"], e["trial"]) for e in doc["episodes"]]
    assert sorted(keys) == [(0, 0), (1, 0)]  # every episode exactly once
    assert not any(e["errored"] for e in doc["episodes"])
    (retry,) = doc["retries"]
    assert (retry["task_id"], retry["trial"]) in keys and retry["attempt"] == 2
    assert "worker 0" in retry["reason"] and "exited with code 57" in retry["reason"]
    assert doc["summary"]["episodes"] == 2


def test_resume_after_interrupted_parallel_run_runs_only_the_missing_episodes(server, tmp_path):
    res = tmp_path / "resume.json"
    args = _base(server, res, trials=2)
    proc = subprocess.Popen([sys.executable, "-m", "client.libero.evaluate", *args, "--workers", "2"], cwd=REPO,
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if res.exists() and json.loads(res.read_text())["episodes"]:
                break
            time.sleep(0.2)
        else:
            pytest.fail("no episode was written in 120 s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole run (parent + workers) is interrupted at once
        proc.wait()
    before = {(e["task_id"], e["trial"]): e for e in json.loads(res.read_text())["episodes"]}
    assert 0 < len(before) < 4
    r = _evaluate([*args, "--workers", "2", "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"{4 - len(before)} episodes to run ({len(before)} already done)" in r.stderr
    doc = json.loads(res.read_text())
    after = {(e["task_id"], e["trial"]): e for e in doc["episodes"]}
    assert len(doc["episodes"]) == 4 and sorted(after) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for k, e in before.items():
        assert after[k] == e  # the finished episodes were not run again
    assert doc["summary"]["episodes"] == 4


def test_ray_cluster_retries_a_killed_worker(server, tmp_path):
    pytest.importorskip("ray", reason="needs ray (pip install '.[ray]')")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 100 * 2**20,
                                                            "include_dashboard": False})
    try:
        cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
        cluster.wait_for_nodes()
        res, marker, address = tmp_path / "ray.json", tmp_path / "killed_once", cluster.address
        r = _evaluate([*_base(server, res), "--ray", address],
                      env=_env(**{TEST_HOOK_RAY_KILL_ONCE: str(marker)}))
        assert r.returncode == 0, r.stderr[-3000:]
    finally:
        cluster.shutdown()
    assert marker.exists()  # a Ray worker did die holding an episode
    doc = json.loads(res.read_text())
    keys = sorted((e["task_id"], e["trial"]) for e in doc["episodes"])
    assert keys == [(0, 0), (1, 0)] and not any(e["errored"] for e in doc["episodes"])
    (retry,) = doc["retries"]
    killed = marker.read_text().split()[1]
    assert f"{retry['task_id']}:{retry['trial']}" == killed and retry["attempt"] == 2
    assert doc["config"]["ray"] == address


def test_ray_workers_keep_their_env_between_episodes_and_match_the_pool(server, tmp_path):
    """A Ray worker process runs many episode tasks; it keeps its simulator between them (an env build and a hard
    reset are ~6 s on this machine), and the episodes are those of the local pool."""
    pytest.importorskip("ray", reason="needs ray (pip install '.[ray]')")
    ray_res, pool_res = tmp_path / "ray.json", tmp_path / "pool.json"
    r = _evaluate([*_base(server, ray_res, tasks="0", trials=3), "--ray", "local"])
    assert r.returncode == 0, r.stderr[-3000:]
    reused = re.search(r"ray: (\d+) of 3 episodes ran in an env their worker had already built", r.stderr)
    assert reused and int(reused.group(1)) >= 1, r.stderr[-3000:]  # 3 episodes of one task, at most 2 workers
    p = _evaluate([*_base(server, pool_res, tasks="0", trials=3), "--workers", "1"])
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(_outcomes(json.loads(ray_res.read_text()))) == _outcomes(json.loads(pool_res.read_text()))


def test_success_matrix_on_ray_records_what_the_pool_records(tmp_path):
    """bench_libero_success's matrix (one server per variant) runs on Ray as on the local pool: the same episodes,
    the same results files."""
    pytest.importorskip("ray", reason="needs ray (pip install '.[ray]')")
    from benchmarks.support import libero_matrix as lm

    variants = [lm.Variant("a", ["--policy", "debug"]), lm.Variant("b", ["--policy", "debug", "--policy-option",
                                                                          "horizon=4"])]
    docs = {}
    for engine in ("pool", "ray"):
        cfg = lm.MatrixConfig(suite="libero_spatial", tasks=[0, 1], trials=1, workers=2, out_dir=tmp_path / engine,
                              max_steps=6, resolution=64, server_python=SERVER_PYTHON, client_python=sys.executable,
                              ray="local" if engine == "ray" else None, ready_timeout_s=120)
        report = lm.run_matrix(variants, cfg)
        assert report["failures"] == [] and report["ray"] == cfg.ray
        docs[engine] = {v.label: json.loads(lm.results_path(cfg, v.label).read_text()) for v in variants}
    for label in ("a", "b"):
        pool, ray_doc = docs["pool"][label], docs["ray"][label]
        assert sorted(_outcomes(ray_doc)) == sorted(_outcomes(pool)) and len(pool["episodes"]) == 2
        assert set(ray_doc) == set(pool) and ray_doc["summary"] == pool["summary"]
    assert {e["num_queries"] for e in docs["ray"]["b"]["episodes"]} != {e["num_queries"] for e in docs["ray"]["a"][
        "episodes"]}  # each episode went to its own variant's server


def test_ray_flag_without_ray_names_the_flag(tmp_path, monkeypatch):
    import importlib.util

    from client.libero.config import config_from_args

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(ValueError, match="--ray auto needs the ray package"):
        config_from_args(["libero_spatial", "--headless", "--ray", "auto"])
    with pytest.raises(ValueError, match="--workers and --ray are exclusive"):
        config_from_args(["libero_spatial", "--headless", "--ray", "auto", "--workers", "2"])


# A parent in the server's environment (.venv, which has torch and no LIBERO) whose workers run this simulator
# interpreter, as benchmarks/bench_quant_policy.py drives the success matrix; it imports torch so that a worker
# re-running it as its main module would fail.
_FOREIGN_PARENT = """
import json, sys
import torch  # noqa: F401 - only the parent's environment has it
from client.libero.config import EvalConfig
from client.libero.parallel import EpisodeJob, EpisodePool

if __name__ == "__main__":
    cfg = EvalConfig(suite="libero_spatial", port=int(sys.argv[2]), max_steps=6, resolution=64, save_video=False,
                     progress=False, headless=True)
    out = []
    EpisodePool(1, python=sys.argv[1]).run([EpisodeJob(cfg, 0, 0)], lambda job, ep: out.append(ep.__dict__))
    print(json.dumps(out))
"""


def test_workers_on_another_environments_interpreter_import_from_their_own(server, tmp_path):
    from client.libero.parallel import worker_sys_path

    assert importlib.util.find_spec("torch") is None, "this test needs a simulator env without torch"
    venv = str(Path(SERVER_PYTHON).parent.parent)
    theirs = worker_sys_path(SERVER_PYTHON)
    assert any(p.startswith(venv + os.sep) and p.endswith("site-packages") for p in theirs)
    assert not any(p.startswith(sys.prefix + os.sep) for p in theirs)  # none of this environment's packages
    script = tmp_path / "parent.py"
    script.write_text(_FOREIGN_PARENT)
    r = subprocess.run([SERVER_PYTHON, str(script), sys.executable, str(server.port)], cwd=REPO,
                       env=_env(PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (ep,) = json.loads(r.stdout.strip().splitlines()[-1])
    assert (ep["task_id"], ep["trial"], ep["errored"]) == (0, 0, False), ep["error"]
    assert ep["steps"] == 6 and ep["num_queries"] >= 1 and ep["task_name"]


def test_next_job_builds_each_tasks_env_once_when_tasks_outnumber_workers() -> None:
    """Two workers on 3 tasks x 2 trials: each task's episodes stay with one worker (3 env builds, not 6)."""
    import collections

    from client.libero.parallel import next_job

    jobs = [(t, k) for t in range(3) for k in range(2)]
    pending = collections.deque(range(len(jobs)))
    finished = [False] * len(jobs)
    task_of = lambda j: jobs[j][0]  # noqa: E731
    held: dict[str, int | None] = {"a": None, "b": None}
    order: dict[str, list[tuple[int, int]]] = {"a": [], "b": []}
    while pending:
        for w in ("a", "b"):
            other = {t for o, t in held.items() if o != w and t is not None}
            j = next_job(pending, finished, task_of, held[w], other)
            if j is None:
                break
            finished[j] = True
            held[w] = task_of(j)
            order[w].append(jobs[j])
    assert order == {"a": [(0, 0), (0, 1), (2, 0)], "b": [(1, 0), (1, 1), (2, 1)]}
    builds = sum(len({t for t, _ in seq}) for seq in order.values())
    assert builds == 4  # 3 tasks; only the last task, split to keep both workers busy, is built twice
    # a finished job at the head is skipped, and with nothing left there is nothing to take
    assert next_job(collections.deque([0]), [True], task_of, None, set()) is None


def test_render_threads_divide_the_cores_among_the_workers() -> None:
    from client.libero.parallel import render_threads_per_worker

    assert [render_threads_per_worker(w, cpus=2) for w in (1, 2, 3)] == [2, 1, 1]
    assert render_threads_per_worker(4, cpus=16) == 4
