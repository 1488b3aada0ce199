"""Expert labels on the policy's own states (DAgger): ``run_libero_eval.sh SUITE --headless --expert-labels DIR``.

Why: behaviour cloning trains on the expert's states only, so a policy that drifts a centimetre off them meets
states it never saw and its errors compound (Ross et al., 2011). The shipped OpenVLA-RSD fails libero_spatial's
raised-bowl tasks this way (tasks 2, 3, 5 solved 1-2 times in 10) although the expert solves 99%. DAgger's remedy is
to run the *policy*, ask the expert what it would do from every state the policy visits, and train on the union.

How a label is made without disturbing the episode: at each query the evaluation sends the observation to the
server as usual and, on the side, copies the simulator's full state (and the pinned fixture layout) into a
physics-only twin of the env (no renderer: ~6 ms per step instead of ~360 ms), lets
:meth:`client.libero.expert.ScriptedExpert.take_over` infer the phase from that state and roll ``horizon`` steps,
and keeps those actions as the label chunk. The evaluated episode, its success and its results file are exactly
what they would be without labels (``--expert-mix 0``); ``--expert-mix b`` executes the expert's chunk instead of
the policy's on a fraction ``b`` of the queries (DAgger's beta), seeded per episode.

Output: one HDF5 per episode, ``DIR/<task>_trial<k>.hdf5``, in the rendered demonstration layout of
:mod:`client.dataset` with the label chunks in ``obs/expert_chunks`` (one row per query) and
``attrs["labels"] = "expert_chunks"``: the trainers' ``--demos`` read it beside the expert's demonstrations (the
label chunk replaces the executed actions as the sample's target), the action-only readers skip it.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np

from client.dataset import write_labelled_episode
from client.libero.record_demos import record_frame

log = logging.getLogger(__name__)

LABEL_HORIZON = 16  # steps per label chunk: the longest chunk a shipped policy predicts (GR00T's 16)


def label_path(out_dir: str | Path, task_name: str, trial: int) -> Path:
    return Path(out_dir) / f"{task_name}_trial{int(trial):03d}.hdf5"


class ExpertLabeler:
    """Records one episode's queries with the scripted expert's chunk from each queried state.

    Use: :meth:`begin` after the episode's reset, :meth:`observe` at each query (returns the label chunk, or
    ``None`` when the expert cannot act from that state), :meth:`step` after each executed action, :meth:`end`
    to write the file. The physics-only twin env is built once per task and reused.
    """

    def __init__(self, out_dir: str | Path, horizon: int = LABEL_HORIZON, mix: float = 0.0, seed: int = 0) -> None:
        if horizon < 1:
            raise ValueError(f"label horizon must be >= 1, got {horizon}")
        if not 0.0 <= mix <= 1.0:
            raise ValueError(f"--expert-mix must be in [0, 1], got {mix}")
        self.out_dir = Path(out_dir)
        self.horizon = int(horizon)
        self.mix = float(mix)
        self.seed = int(seed)
        self._twin: Any = None
        self._twin_task: str | None = None
        self._goal: Any = None
        self.rec: dict[str, list[Any]] = {}
        self.unlabelled = 0
        self.active = False
        self.carry_z: float | None = None
        self._unscriptable: set[str] = set()

    # -- the physics-only twin -------------------------------------------------------------------------------
    def _twin_for(self, task: Any, seed: int) -> Any:
        from client.libero.env import close_env, make_env
        from client.libero.expert import parse_goal

        if self._twin_task != task.bddl_file:
            if self._twin is not None:
                close_env(self._twin)
                self._twin = self._twin_task = None
            twin = make_env(task, cameras=False)
            twin.seed(seed)
            twin.reset()
            try:
                self._goal = parse_goal(twin)
            except NotImplementedError:
                close_env(twin)
                raise
            self._twin, self._twin_task = twin, task.bddl_file
        return self._twin

    def label(self, env: Any) -> tuple[np.ndarray | None, str]:
        """The expert's next ``horizon`` actions from ``env``'s current state (computed in the twin), and the phase
        it took over in; ``None`` when it gives up within the chunk (e.g. it finds the grasp missed)."""
        src, dst = env.sim.model, self._twin.sim.model
        if src.body_pos.shape != dst.body_pos.shape:
            raise RuntimeError("the physics-only twin's model differs from the evaluated env's")
        dst.body_pos[:] = src.body_pos  # the pinned fixture layout of this episode
        dst.body_quat[:] = src.body_quat
        return self.label_state(env.get_sim_state())

    def label_state(self, sim_state: np.ndarray) -> tuple[np.ndarray | None, str]:
        """:meth:`label` from a flattened simulator state, in the twin's current fixture layout."""
        from client.libero.expert import ScriptedExpert

        twin = self._twin
        inner = getattr(twin, "env", twin)
        inner.timestep, inner.done = 0, False  # the twin's own step count must never end its episode
        obs = twin.set_init_state(np.asarray(sim_state, dtype=np.float64))
        if self.carry_z is None:  # the episode's first label: nothing has been moved yet, plan as a demonstration
            self.carry_z = float(ScriptedExpert(twin, self._goal).carry_z)
        expert = ScriptedExpert.take_over(twin, self._goal, obs, carry_z=self.carry_z)
        phase = expert.phase.name
        actions = []
        for _ in range(self.horizon):
            a = expert.act(obs)
            if expert.failed:
                return None, phase
            actions.append(a)
            obs, _, _, _ = twin.step(a.astype(np.float64))
        return np.asarray(actions, dtype=np.float32), phase

    # -- one episode -----------------------------------------------------------------------------------------
    def begin(self, task: Any, trial: int, init_index: int, seed: int) -> bool:
        """Start recording an episode; ``False`` (and a warning once per task) when the scripted expert cannot do
        the task (not a pick-and-place goal): that episode runs unlabelled."""
        self.active = False
        if task.bddl_file in self._unscriptable:
            return False
        try:
            self._twin_for(task, seed)
        except NotImplementedError as e:
            self._unscriptable.add(task.bddl_file)
            log.warning("task %d (%s): no expert labels, the scripted expert cannot do it: %s", task.task_id,
                        task.name, e)
            return False
        self.active = True
        self.carry_z = None
        self.task, self.trial, self.init_index, self.episode_seed = task, int(trial), int(init_index), int(seed)
        self.rng = np.random.default_rng([self.seed, task.task_id, int(trial)])
        self.unlabelled = 0
        self.rec = {k: [] for k in ("agentview_rgb", "eye_in_hand_rgb", "ee_pos", "ee_ori", "gripper_states",
                                    "joint_states", "state_8d", "expert_chunks", "phases", "frame_steps",
                                    "executed_expert", "states", "actions", "rewards", "dones", "sim_states")}
        return True

    def observe(self, env: Any, raw: dict[str, Any], step: int) -> np.ndarray | None:
        """Record the queried observation with its label; returns the label chunk when the expert's chunk should be
        executed instead of the policy's (``--expert-mix``), else ``None``."""
        try:
            chunk, phase = self.label(env)
        except Exception:  # noqa: BLE001 - a labelling failure must never turn into a failed evaluation episode
            log.exception("task %d trial %d step %d: the expert could not label this state; query left unlabelled",
                          self.task.task_id, self.trial, step)
            chunk = None
        if chunk is None:
            self.unlabelled += 1
            return None
        r = self.rec
        r["frame_steps"].append(int(step))
        r["sim_states"].append(np.asarray(env.get_sim_state(), np.float64))
        record_frame(r, raw)
        r["expert_chunks"].append(chunk)
        r["phases"].append(phase)
        use_expert = self.mix > 0 and float(self.rng.random()) < self.mix
        r["executed_expert"].append(use_expert)
        return chunk if use_expert else None

    def step(self, env: Any, action: np.ndarray, reward: float, done: bool) -> None:
        r = self.rec
        r["states"].append(np.asarray(env.get_sim_state(), np.float64))
        r["actions"].append(np.asarray(action, np.float32))
        r["rewards"].append(float(reward))
        r["dones"].append(bool(done))

    def end(self, success: bool, errored: bool) -> Path | None:
        """Write the episode (not an errored one: its states are the server's fault, not the policy's)."""
        r = self.rec
        self.active = False
        if errored or not r.get("frame_steps") or not r.get("actions"):
            return None
        # a query whose step never ran (the episode ended first) cannot index the actions
        keep = [i for i, s in enumerate(r["frame_steps"]) if s < len(r["actions"])]
        rec: dict[str, Any] = {k: np.asarray([r[k][i] for i in keep]) for k in (
            "agentview_rgb", "eye_in_hand_rgb", "ee_pos", "ee_ori", "gripper_states", "joint_states", "state_8d",
            "expert_chunks", "frame_steps", "executed_expert", "sim_states")}
        rec["phases"] = [r["phases"][i] for i in keep]
        rec["states"] = np.asarray(r["states"])
        rec["rewards"] = np.asarray(r["rewards"], np.float32)
        rec["dones"] = np.asarray(r["dones"], np.uint8)
        rec["success_step"] = len(r["actions"]) if success else None
        path = label_path(self.out_dir, self.task.name, self.trial)
        write_labelled_episode(path, self.task, self.trial, self.init_index, np.asarray(r["actions"], np.float32),
                               rec, seed=self.episode_seed, success=success, mix=self.mix,
                               unlabelled=self.unlabelled)
        return path

    def close(self) -> None:
        from client.libero.env import close_env

        if self._twin is not None:
            close_env(self._twin)
        self._twin = self._twin_task = None


# ---------------------------------------------------------------------------------------------- relabelling
def relabel(src: str | Path, out: str | Path) -> dict[str, int]:
    """Recompute every label of the DAgger episodes in ``src`` with today's expert into ``out`` (same layout).

    Why: collecting costs the policy's episodes (rendering); a label costs 16 physics steps. When the expert's
    take-over changes (a fix), the recorded simulator states give the new labels without running the policy again.
    Each query's state is ``obs/sim_states`` (older files: the state after the previous step, and for the first
    query the protocol's reset and wait steps replayed). Queries the expert cannot label now are dropped. Resumable:
    an episode already in ``out`` is skipped.
    """
    import h5py

    from client.dataset import EXPERT_CHUNKS_KEY, write_labelled_episode
    from client.libero.env import get_suite_tasks, reset_to_init, setup_headless_gl, write_libero_config
    from client.libero.protocol import NUM_WAIT_STEPS, WAIT_ACTION

    setup_headless_gl()
    write_libero_config()
    files = sorted(Path(src).glob("*.hdf5"))
    if not files:
        raise FileNotFoundError(f"no DAgger episodes (*.hdf5) in {src}")
    suites: dict[str, list[Any]] = {}
    lab = ExpertLabeler(out)
    counts = {"episodes": 0, "queries": 0, "dropped": 0, "skipped": 0}
    obs_keys = ("agentview_rgb", "eye_in_hand_rgb", "ee_pos", "ee_ori", "gripper_states", "joint_states", "state_8d",
                "frame_steps", "executed_expert")
    try:
        for path in files:
            if (Path(out) / path.name).exists():
                counts["skipped"] += 1
                continue
            with h5py.File(path, "r") as f:
                info = json.loads(f["data"].attrs["problem_info"])
                g = f["data/demo_0"]
                params = json.loads(g.attrs["expert_params"])
                seed, init_index = int(g.attrs["seed"]), int(g.attrs["init_state_index"])
                o = g["obs"]
                rec: dict[str, Any] = {k: o[k][()] for k in obs_keys}
                steps = rec["frame_steps"]
                states = g["states"][()]
                sim = o["sim_states"][()] if "sim_states" in o else None
                actions = g["actions"][()]
                rec.update(states=states, rewards=g["rewards"][()], dones=g["dones"][()])
            tasks = suites.setdefault(info["suite"], get_suite_tasks(info["suite"]))
            task = tasks[int(info["task_id"])]
            twin = lab._twin_for(task, seed)
            lab.carry_z = None
            start = reset_to_init(twin, task, init_index, seed)  # the pinned layout of this seed, as evaluated
            for _ in range(NUM_WAIT_STEPS):
                start, _, _, _ = twin.step(WAIT_ACTION.astype(np.float64))
            first = np.asarray(twin.get_sim_state(), np.float64)
            keep, chunks, phases, sims = [], [], [], []
            for i, s in enumerate(steps):
                state = sim[i] if sim is not None else (states[s - 1] if s > 0 else first)
                chunk, phase = lab.label_state(state)
                if chunk is None:
                    counts["dropped"] += 1
                    continue
                keep.append(i)
                chunks.append(chunk)
                phases.append(phase)
                sims.append(state)
            rec = {k: (v[keep] if k in obs_keys else v) for k, v in rec.items()}
            rec.update({EXPERT_CHUNKS_KEY: np.asarray(chunks, np.float32), "phases": phases,
                        "sim_states": np.asarray(sims)})
            rec["success_step"] = len(actions) if params.get("success") else None
            write_labelled_episode(Path(out) / path.name, task, int(params.get("trial", 0)), init_index, actions, rec,
                                   seed=seed, **{k: v for k, v in params.items() if k != "trial"},
                                   relabelled_from=str(path))
            counts["episodes"] += 1
            counts["queries"] += len(keep)
    finally:
        lab.close()
    return counts


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m client.libero.dagger", description=relabel.__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("relabel", help="recompute the labels of recorded DAgger episodes")
    r.add_argument("src", help="directory of DAgger episodes (run_libero_eval.sh --expert-labels DIR)")
    r.add_argument("out", help="directory for the relabelled episodes (must differ from src)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if Path(args.src).resolve() == Path(args.out).resolve():
        print("error: relabel writes new files: OUT must differ from SRC", file=sys.stderr)
        return 2
    try:
        counts = relabel(args.src, args.out)
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
