"""LIBERO evaluation on several simulators: ``--workers N`` processes on this machine, or Ray tasks (``--ray``).

Why: an episode costs one CPU core of simulation and rendering; the server answers many clients at once, so the
throughput of an evaluation is the number of simulators running.

Design (``--workers N``, :class:`EpisodePool`):

* **one queue**, held by the parent: the pending (config, task, trial) jobs. A worker is handed the next job when
  it is idle (preferably one of the task its simulator env is already built for, as the single-process loop reuses
  the env across a task's trials), so the parent always knows which job each worker holds.
* **workers**: ``spawn``ed processes running :func:`drain_worker`, each with its own LIBERO env and its own
  :class:`client.policy_client.PolicyClient` (a connection is per process); an episode is
  :func:`client.libero.evaluate.run_episode`, exactly as in the single-process loop.
* **merge**: workers send each finished episode back; only the parent writes the results file
  (:class:`client.libero.results.ResultsFile`: atomic rewrite per episode, same schema as a single-process run), so
  an interruption loses at most the episodes in flight. ``--resume`` skips finished episodes before the queue is
  built, as before.
* **retry**: a worker that dies (killed, crashed simulator) or exceeds the episode timeout has its job put back at
  the front of the queue, once, and a fresh worker replaces it; the retry is recorded in the results file's
  ``retries`` list. An episode lost twice is recorded ``errored`` (so ``--resume`` runs it again). An episode is
  never recorded twice: a late result of a job already recorded is dropped.

``--ray`` (:class:`RayEpisodePool`, the same ``run(jobs, on_result, on_retry)`` interface): each episode is one
Ray task, run by its worker process's simulator (kept between tasks); Ray re-runs a task whose worker was lost
(``max_retries=1``), a tiny actor counts attempts so the driver can record the retry; the driver merges results as
they arrive, into the same file. ``ray`` is imported only there.

Messages on the worker pipes are multiprocessing's own (pickled between this process and the children it
spawned, never bytes from the network). A job carries its own config, so one pool can serve several servers:
``benchmarks/support/libero_matrix.py`` runs its success matrices (one server per variant) on it, with workers on
another environment's interpreter (``python=``) when the parent runs elsewhere.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import multiprocessing.spawn as mp_spawn
import os
import pickle
import subprocess
import sys
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from client.libero.config import EvalConfig
from client.libero.results import EpisodeResult, ResultsFile

log = logging.getLogger("client.libero.parallel")

#: Test hook (tests/test_libero_parallel.py only): the worker with this index exits hard (``os._exit``) as soon as
#: it receives its first episode, as a killed worker would.
TEST_HOOK_EXIT_WORKER = "VLA_EVAL_TEST_HOOK_EXIT_WORKER"
#: Test hook: a marker file path; the first Ray episode task to find it absent creates it and exits hard, once.
TEST_HOOK_RAY_KILL_ONCE = "VLA_EVAL_TEST_HOOK_RAY_KILL_ONCE"
TEST_HOOK_EXIT_CODE = 57

MAX_ATTEMPTS = 2  # a lost episode is retried once


@dataclass
class EpisodeJob:
    """One episode to run: ``cfg`` says the suite, server and episode settings; ``tag`` is the caller's label."""

    cfg: EvalConfig
    task_id: int
    trial: int
    tag: Any = None

    def key(self) -> tuple[int, int]:
        return (self.task_id, self.trial)


def errored_episode(job: EpisodeJob, error: str) -> EpisodeResult:
    """The record of an episode that could not be run (its workers were lost): ``errored``, retried by --resume."""
    return EpisodeResult(task_id=job.task_id, task_name="", instruction="", trial=job.trial,
                         init_state_index=job.trial, success=False, errored=True, steps=0, wall_time_s=0.0,
                         error=error)


# -- the worker side ---------------------------------------------------------------------------------------------
class _EpisodeRunner:
    """A worker's simulator and server connections: reuses the env while the task stays the same."""

    def __init__(self, gl_backend: str | None = None) -> None:
        from client.libero.env import setup_headless_gl, write_libero_config

        setup_headless_gl(gl_backend)
        write_libero_config()
        self.tasks: dict[str, list[Any]] = {}
        self.clients: dict[tuple[str, int, float], tuple[Any, dict[str, Any]]] = {}
        self.env: Any = None
        self.gate: Any = None
        self.env_key: tuple[Any, ...] | None = None
        self.labeler: Any = None

    def current_task(self) -> tuple[str, int] | None:
        return None if self.env_key is None else (self.env_key[0], self.env_key[1])

    def run(self, cfg: EvalConfig, task_id: int, trial: int) -> EpisodeResult:
        from client.libero.env import CameraGate, get_suite_tasks, make_env
        from client.libero.evaluate import run_episode
        from client.libero.video import episode_video_name, write_video
        from client.policy_client import PolicyClient

        if cfg.suite not in self.tasks:
            self.tasks[cfg.suite] = get_suite_tasks(cfg.suite)
        task = self.tasks[cfg.suite][task_id]
        ckey = (cfg.host, cfg.port, cfg.timeout_s)
        if ckey not in self.clients:
            self.clients[ckey] = (PolicyClient(cfg.host, cfg.port, timeout_s=cfg.timeout_s), {})
        client, contract_box = self.clients[ckey]
        env_key = (cfg.suite, task_id, cfg.resolution, cfg.render_all_steps, cfg.save_video)
        if self.env_key != env_key or contract_box.pop("env_broken", None):
            self.close_env()
            self.env = make_env(task, cfg.resolution, cameras=True)
            self.gate = None if cfg.render_all_steps else CameraGate(
                self.env, always_render=("agentview",) if cfg.save_video else ())
            self.env_key = env_key
        if self.labeler is None and cfg.expert_labels is not None:
            from client.libero.evaluate import make_labeler

            self.labeler = make_labeler(cfg)
        try:
            ep, frames = run_episode(self.env, task, trial, cfg, client, contract_box, self.gate, self.labeler)
        finally:
            if contract_box.get("env_broken"):
                self.close_env()
                contract_box.pop("env_broken", None)
        if cfg.save_video and frames:
            outcome = "errored" if ep.errored else ("success" if ep.success else "failure")
            path = cfg.videos_path / episode_video_name(task_id, task.name, trial, outcome)
            write_video(path, frames)
            ep.video = str(path)
        return ep

    def close_env(self) -> None:
        from client.libero.env import close_env

        if self.env is not None:
            try:
                close_env(self.env)
            except Exception:  # noqa: BLE001 - a broken env is dropped either way
                log.exception("closing the env failed")
        self.env = self.gate = self.env_key = None

    def close(self) -> None:
        self.close_env()
        if self.labeler is not None:
            self.labeler.close()
            self.labeler = None
        for client, _ in self.clients.values():
            client.close()
        self.clients.clear()


def render_threads_per_worker(workers: int, cpus: int | None = None) -> int:
    """llvmpipe threads for each of ``workers`` simulator processes: the cores divided among them.

    Why: Mesa's CPU renderer (EGL/OSMesa without a GPU) starts one thread per core in every process. One process
    gains from that (libero_spatial at 128 px on 2 cores: 10.3 s/episode vs 11.9 with one thread), but with a
    process per core the threads only contend (2 workers: 13.2 s/episode vs 12.5 with one thread each)."""
    return max(1, (cpus if cpus is not None else os.cpu_count() or 1) // max(1, workers))


def drain_worker(wid: int, conn: Any, gl_backend: str | None = None, log_level: int = logging.INFO,
                 render_threads: int | None = None) -> None:
    """A worker process: announce ``ready``, then run each job the parent sends on ``conn`` until ``None``.

    ``conn`` is this worker's own end of a pipe (not a queue shared by the workers: a worker killed while writing
    to a shared queue could leave its lock held and hang everyone else).

    Messages to the parent: ``("ready", wid, None, None)``; ``("done", wid, job_id, episode_dict)``;
    ``("error", wid, job_id, reason)`` when the job could not be run at all (e.g. the env cannot be built).
    """
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s worker{wid} %(name)s: %(message)s")
    for noisy in ("robosuite", "OpenGL", "numba"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    hook = os.environ.get(TEST_HOOK_EXIT_WORKER, "")
    if render_threads is not None:  # before the first GL context; a value the user set wins
        os.environ.setdefault("LP_NUM_THREADS", str(render_threads))
    runner = _EpisodeRunner(gl_backend)
    parent = os.getppid()
    conn.send(("ready", wid, None, None))
    try:
        while True:
            if not conn.poll(2.0):
                if os.getppid() != parent:  # the parent was killed: nobody will read our results
                    break
                continue
            try:
                job = conn.recv()
            except EOFError:
                break
            if job is None:
                break
            job_id, cfg, task_id, trial = job
            if hook.strip() != "" and int(hook) == wid:  # test hook: die holding an episode, like a killed worker
                os._exit(TEST_HOOK_EXIT_CODE)
            try:
                ep = runner.run(cfg, task_id, trial)
            except Exception as e:  # noqa: BLE001 - reported to the parent, which retries the job elsewhere
                log.exception("task %d trial %d could not be run", task_id, trial)
                runner.close_env()
                conn.send(("error", wid, job_id, f"worker {wid}: {type(e).__name__}: {e}"))
                continue
            conn.send(("done", wid, job_id, asdict(ep)))
    finally:
        runner.close()


# -- the parent side ---------------------------------------------------------------------------------------------
def next_job(pending: collections.deque[int], finished: Sequence[bool], task_of: Callable[[int], Any],
             worker_task: Any, held: set[Any]) -> int | None:
    """Take a worker's next job off ``pending`` (in order, skipping finished ones): one of the task whose env it
    holds, else one of a task no other worker holds, else the first.

    Why: building a LIBERO env costs seconds, so each task's env should be built once. Taking simply the next job
    sent both workers through every task when a task has few trials (10 tasks x 2 trials: 20 env builds instead
    of 10; ``bench_libero_parallel`` on 4 tasks x 2 trials: 65.1 s -> 61.9 s for 2 workers)."""
    while pending and finished[pending[0]]:
        pending.popleft()
    for wanted in (lambda t: worker_task is not None and t == worker_task, lambda t: t not in held):
        for i, job_id in enumerate(pending):
            if not finished[job_id] and wanted(task_of(job_id)):
                del pending[i]
                return job_id
    while pending:
        job_id = pending.popleft()
        if not finished[job_id]:
            return job_id
    return None


@dataclass
class _Worker:
    wid: int
    proc: Any
    conn: Any  # the parent's end of this worker's pipe
    ready: bool = False
    job_id: int | None = None
    since: float = 0.0
    task: tuple[str, int] | None = None  # the (suite, task) its env holds


def worker_sys_path(python: str) -> list[str]:
    """The ``sys.path`` a worker on interpreter ``python`` needs: this process's own entries (the checkout,
    ``PYTHONPATH``) without those of its environment, then ``python``'s own (its stdlib and site-packages).

    Why: spawn gives a child the parent's ``sys.path``, so a worker on the simulator's venv started from a parent
    in the server's venv would import from the server's site-packages and find no LIBERO.
    """
    r = subprocess.run([python, "-c", "import json, sys; print(json.dumps(sys.path))"], capture_output=True,
                       text=True, timeout=300, check=False)
    if r.returncode != 0:
        raise RuntimeError(f"cannot run the worker interpreter {python}: {r.stderr.strip()[-500:]}")
    theirs = [p for p in json.loads(r.stdout.strip().splitlines()[-1]) if p]
    env_dirs = tuple(os.path.join(os.path.abspath(d), "") for d in {sys.prefix, sys.exec_prefix, sys.base_prefix})
    ours = [p for p in sys.path if not os.path.join(os.path.abspath(p or os.curdir), "").startswith(env_dirs)]
    return list(dict.fromkeys(ours + theirs))


@contextlib.contextmanager
def _spawning_on(python: str, sys_path: list[str]) -> Iterator[None]:
    """While a child is started: spawn runs ``python`` with ``sys_path`` and re-imports no ``__main__``.

    Why the ``__main__``: spawn re-runs the parent's main module in every child, and a parent's main (a benchmark
    importing torch) need not import on the workers' interpreter; the worker needs only :func:`drain_worker`.
    Spawn reads all three (executable, ``sys.path``, ``__main__``) in ``Process.start``; they are restored after.
    """
    saved = mp_spawn.get_executable(), sys.path[:], sys.modules["__main__"]
    mp_spawn.set_executable(python)
    sys.path[:] = sys_path
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        mp_spawn.set_executable(saved[0])
        sys.path[:] = saved[1]
        sys.modules["__main__"] = saved[2]


class EpisodePool:
    """``workers`` simulator processes draining one queue of :class:`EpisodeJob` (see the module docstring).

    ``python``: the workers' interpreter (default: this one); another one (another venv) gets its own ``sys.path``
    (:func:`worker_sys_path`). ``episode_timeout_s``: a worker holding one episode
    longer is killed and the episode retried (``None``: no limit). ``max_respawns``: how many lost workers are
    replaced (default ``2 * workers + 2``), so a worker that dies at start-up cannot loop forever.
    """

    def __init__(self, workers: int, *, python: str | None = None, episode_timeout_s: float | None = None,
                 gl_backend: str | None = None, max_respawns: int | None = None) -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.workers = workers
        self.python = python
        self.episode_timeout_s = episode_timeout_s
        self.gl_backend = gl_backend
        self.max_respawns = 2 * workers + 2 if max_respawns is None else max_respawns

    def run(self, jobs: Sequence[EpisodeJob], on_result: Callable[[EpisodeJob, EpisodeResult], None],
            on_retry: Callable[[EpisodeJob, str, int], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> None:
        """Run every job; ``on_result(job, episode)`` once per job, in the parent, as episodes arrive;
        ``on_retry(job, reason, attempt)`` when a lost job is queued again; stops early when ``should_stop()``."""
        if not jobs:
            return
        ctx = mp.get_context("spawn")
        foreign: tuple[str, list[str]] | None = None  # (interpreter, its sys.path) when not this interpreter
        if self.python is not None and os.path.abspath(self.python) != os.path.abspath(sys.executable):
            foreign = (self.python, worker_sys_path(self.python))
        pending: collections.deque[int] = collections.deque(range(len(jobs)))
        attempts = [0] * len(jobs)
        finished = [False] * len(jobs)
        pool: dict[int, _Worker] = {}
        next_wid = 0
        respawns = 0
        level = logging.getLogger().getEffectiveLevel()

        def spawn() -> None:
            nonlocal next_wid
            here, there = ctx.Pipe(duplex=True)
            proc = ctx.Process(target=drain_worker,
                               args=(next_wid, there, self.gl_backend, level, render_threads_per_worker(self.workers)),
                               name=f"libero-worker-{next_wid}", daemon=True)
            with _spawning_on(*foreign) if foreign is not None else contextlib.nullcontext():
                proc.start()
            there.close()  # only the child holds it now: its death gives EOF here
            pool[next_wid] = _Worker(next_wid, proc, here)
            log.info("worker %d started (pid %d)", next_wid, proc.pid)
            next_wid += 1

        def lost(job_id: int, reason: str) -> None:
            if finished[job_id]:
                return
            job = jobs[job_id]
            if attempts[job_id] < MAX_ATTEMPTS:
                log.warning("task %d trial %d lost (%s): retrying it (attempt %d)", job.task_id, job.trial, reason,
                            attempts[job_id] + 1)
                pending.appendleft(job_id)
                if on_retry is not None:
                    on_retry(job, reason, attempts[job_id] + 1)
            else:
                log.error("task %d trial %d lost twice (%s): recorded as errored", job.task_id, job.trial, reason)
                finished[job_id] = True
                on_result(job, errored_episode(job, f"lost {attempts[job_id]} times, last: {reason}"))

        def handle(msg: tuple[str, int, int | None, Any]) -> None:
            kind, wid, job_id, payload = msg
            w = pool.get(wid)
            if kind == "ready":
                if w is not None:
                    w.ready = True
                return
            if w is not None and w.job_id == job_id:
                w.job_id = None
            if job_id is None or finished[job_id]:
                return  # a late result of a job already recorded (its worker was declared lost meanwhile)
            if kind == "done":
                finished[job_id] = True
                try:
                    pending.remove(job_id)  # requeued after a false alarm: the result is here after all
                except ValueError:
                    pass
                on_result(jobs[job_id], EpisodeResult(**payload))
            else:
                lost(job_id, str(payload))

        def drain_messages(block_s: float) -> None:
            conns = {w.conn: w for w in pool.values() if not w.conn.closed}
            for conn in mp_connection.wait(list(conns), timeout=block_s):
                w = conns[conn]
                try:
                    while conn.poll():
                        handle(conn.recv())
                except (EOFError, OSError, pickle.UnpicklingError) as e:  # it died, perhaps mid-message
                    if not isinstance(e, EOFError):
                        log.warning("worker %d: unreadable message (%s): dropping the worker", w.wid, e)
                    conn.close()
                    w.proc.join(timeout=5)
                    if w.proc.is_alive():
                        w.proc.kill()

        def pick(w: _Worker) -> int | None:
            held = {o.task for o in pool.values() if o is not w and o.task is not None}
            return next_job(pending, finished, lambda j: (jobs[j].cfg.suite, jobs[j].task_id), w.task, held)

        try:
            for _ in range(min(self.workers, len(jobs))):
                spawn()
            while not all(finished):
                drain_messages(0.2)
                if should_stop is not None and should_stop():
                    return
                for w in list(pool.values()):
                    if w.proc.is_alive():
                        if (w.job_id is not None and self.episode_timeout_s is not None
                                and time.monotonic() - w.since > self.episode_timeout_s):
                            log.error("worker %d exceeded the episode timeout (%.0fs): killing it",
                                      w.wid, self.episode_timeout_s)
                            w.proc.kill()
                        continue
                    drain_messages(0)  # what it sent before dying counts
                    w.proc.join(timeout=1)
                    w.conn.close()
                    del pool[w.wid]
                    if w.job_id is not None:
                        lost(w.job_id, f"worker {w.wid} (pid {w.proc.pid}) exited with code {w.proc.exitcode}")
                    if not all(finished):
                        if respawns >= self.max_respawns:
                            if not pool:
                                raise RuntimeError(f"every worker died ({respawns} replaced); see the log above")
                            continue
                        respawns += 1
                        spawn()
                for w in pool.values():
                    if w.ready and w.job_id is None and w.proc.is_alive():
                        job_id = pick(w)
                        if job_id is None:
                            break
                        attempts[job_id] += 1
                        job = jobs[job_id]
                        w.job_id, w.since, w.task = job_id, time.monotonic(), (job.cfg.suite, job.task_id)
                        try:
                            w.conn.send((job_id, job.cfg, job.task_id, job.trial))
                        except OSError:  # it just died; the liveness check above requeues the job next round
                            pass
        finally:
            for w in pool.values():
                if w.proc.is_alive():
                    try:
                        w.conn.send(None)
                    except (OSError, ValueError):
                        pass
            deadline = time.monotonic() + 10.0
            for w in pool.values():
                w.proc.join(timeout=max(0.1, deadline - time.monotonic()))
                if w.proc.is_alive():
                    w.proc.kill()
                    w.proc.join(timeout=5)
                w.conn.close()


# -- the evaluation client's parallel paths ---------------------------------------------------------------------
def _progress(cfg: EvalConfig, total: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=cfg.suite, unit="ep", disable=not cfg.progress, dynamic_ncols=True)


def _postfix(bar: Any, results: ResultsFile) -> None:
    s = results.document()["summary"]
    rate = "-" if s["success_rate"] is None else f"{100 * s['success_rate']:.1f}%"
    bar.set_postfix_str(f"success {s['successes']}/{s['valid_episodes']} ({rate}) err {s['errored']}")
    bar.update(1)


# -- Ray ---------------------------------------------------------------------------------------------------------
class _AttemptCounter:
    """A Ray actor (num_cpus=0): how many times each episode task has started, so retries can be recorded."""

    def __init__(self) -> None:
        self.n: dict[str, int] = {}

    def start(self, key: str) -> int:
        self.n[key] = self.n.get(key, 0) + 1
        return self.n[key]


#: The simulator of this Ray worker process, kept between its episode tasks (:func:`_ray_episode`).
_RAY_RUNNER: _EpisodeRunner | None = None


def _ray_episode(cfg: EvalConfig, task_id: int, trial: int, counter: Any, gl_backend: str | None,
                 kill_marker: str | None, job_key: str) -> dict[str, Any]:
    """One Ray task = one episode, run by this worker process's :class:`_EpisodeRunner`.

    Why the runner outlives the task: Ray reuses a worker process for many tasks, and building a LIBERO env costs
    ~4 s plus ~2 s for its first (hard) reset -- more than half of a 100-step episode. Kept, a worker that gets the
    next episode of the same task (the queue is task-major) reuses its env with a 0.1 s reset; episodes do not depend
    on what the env ran before (pinned fixtures, bit-identical resets: ``client.libero.env.reset_to_init``). A task
    that raises drops the runner, so a broken simulator is never reused."""
    global _RAY_RUNNER
    import ray

    attempt = ray.get(counter.start.remote(job_key))  # one job per key (a matrix has a (task, trial) per variant)
    if kill_marker:  # test hook: the first task to get here dies once, as a lost worker would
        try:
            fd = os.open(kill_marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pass
        else:
            os.write(fd, f"{os.getpid()} {task_id}:{trial}\n".encode())
            os.close(fd)
            os._exit(TEST_HOOK_EXIT_CODE)
    os.environ.setdefault("LP_NUM_THREADS", "1")  # a Ray task holds one CPU (render_threads_per_worker)
    if _RAY_RUNNER is None:
        _RAY_RUNNER = _EpisodeRunner(gl_backend)
    reused = _RAY_RUNNER.current_task() == (cfg.suite, task_id)
    try:
        ep = _RAY_RUNNER.run(cfg, task_id, trial)
    except BaseException:
        _RAY_RUNNER.close()
        _RAY_RUNNER = None
        raise
    return {"episode": asdict(ep), "attempt": attempt, "pid": os.getpid(), "env_reused": reused,
            "node": ray.get_runtime_context().get_node_id()}


class RayEpisodePool:
    """:class:`EpisodePool`'s interface on Ray: every :class:`EpisodeJob` one Ray task (``max_retries=1``).

    ``address``: a cluster's address, ``auto`` (the running local cluster) or ``local`` (start one here, shut down
    afterwards). Results are handed to ``on_result`` in this process as they arrive, so callers (the evaluation
    client, the success matrix) record them exactly as they record the local pool's. A job's ``cfg`` must name a
    server the cluster's nodes can reach (``cfg.host``)."""

    def __init__(self, address: str, gl_backend: str | None = None) -> None:
        self.address = address
        self.gl_backend = gl_backend

    def run(self, jobs: Sequence[EpisodeJob], on_result: Callable[[EpisodeJob, EpisodeResult], None],
            on_retry: Callable[[EpisodeJob, str, int], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> None:
        try:
            import ray
        except ImportError:  # config validation checks this first; kept for direct callers
            raise RuntimeError("--ray needs the ray package: pip install '.[ray]' (scripts/setup.sh libero)") from None
        if not jobs:
            return
        retry = on_retry or (lambda job, reason, attempt: None)
        started_here = False
        if not ray.is_initialized():
            address = None if self.address == "local" else self.address
            log.info("ray: %s", "starting a local instance" if address is None else f"connecting to {address}")
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
            started_here = True
        reused = 0
        try:
            counter = ray.remote(num_cpus=0)(_AttemptCounter).remote()
            episode = ray.remote(num_cpus=1, max_retries=MAX_ATTEMPTS - 1)(_ray_episode)
            marker = os.environ.get(TEST_HOOK_RAY_KILL_ONCE) or None
            refs = {episode.remote(job.cfg, job.task_id, job.trial, counter, self.gl_backend, marker,
                                   str(i)): job for i, job in enumerate(jobs)}
            while refs:
                ready, _ = ray.wait(list(refs), num_returns=1, timeout=5.0)
                for ref in ready:
                    job = refs.pop(ref)
                    try:
                        out = ray.get(ref)
                    except ray.exceptions.RayError as e:  # lost again after the retry, or the task raised
                        log.error("task %d trial %d failed on Ray: %s", job.task_id, job.trial, e)
                        if isinstance(e, ray.exceptions.WorkerCrashedError):  # lost on every attempt
                            retry(job, "ray: worker lost", MAX_ATTEMPTS)
                        ep = errored_episode(job, f"ray: {type(e).__name__}: {str(e)[:500]}")
                    else:
                        ep = EpisodeResult(**out["episode"])
                        reused += bool(out.get("env_reused"))
                        for a in range(2, int(out["attempt"]) + 1):
                            retry(job, "ray: an earlier attempt's worker was lost", a)
                    on_result(job, ep)
                if should_stop is not None and should_stop():
                    for ref in refs:
                        ray.cancel(ref, force=True)
                    break
        finally:
            log.info("ray: %d of %d episodes ran in an env their worker had already built", reused, len(jobs))
            if started_here:
                ray.shutdown()


def evaluate_parallel(cfg: EvalConfig, todo: Sequence[tuple[int, int]], results: ResultsFile,
                      gl_backend: str | None = None) -> bool:
    """Run ``todo`` with ``cfg.workers`` processes (or on Ray with ``cfg.ray``), adding each episode to
    ``results`` as it arrives; returns True when it stopped on an errored episode (``--stop-on-error``)."""
    bar = _progress(cfg, len(todo))
    stopped = False

    def on_result(job: EpisodeJob, ep: EpisodeResult) -> None:
        nonlocal stopped
        results.add(ep)
        _postfix(bar, results)
        if ep.errored and cfg.stop_on_error:
            stopped = True
            log.error("stopping on error (--stop-on-error): %s", ep.error)

    def on_retry(job: EpisodeJob, reason: str, attempt: int) -> None:
        results.record_retry(job.task_id, job.trial, reason, attempt)

    pool = RayEpisodePool(cfg.ray, gl_backend) if cfg.ray is not None else EpisodePool(cfg.workers,
                                                                                       gl_backend=gl_backend)
    try:
        pool.run([EpisodeJob(cfg, t, k) for t, k in todo], on_result, on_retry, should_stop=lambda: stopped)
    finally:
        bar.close()
    return stopped
