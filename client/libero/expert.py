"""A scripted pick-and-place expert for LIBERO that uses privileged simulator state.

Why scripted: the project has no access to the official LIBERO demonstrations (no hub), so it makes its
own. The expert reads the task's goal from the parsed BDDL (``On obj target`` / ``In obj target_region``),
reads object poses from the observation (``<obj>_pos``) and object extents from the MuJoCo model (the
collision geoms' bounding boxes), and drives the OSC_POSE controller with a proportional law through
approach -> descend -> grasp -> lift -> carry -> lower -> release -> retreat waypoints. The gripper is
kept pointing straight down with its fingers closing along world y.

Bowls are grasped by the rim (one finger inside, one outside the wall), because a Panda gripper cannot
span a LIBERO bowl; other objects are grasped at their centre. A small set of parameters (which side of the
rim, grasp depth, speed) is randomised per attempt so a search over attempts finds a trajectory that works
for awkward initial states; the trajectory is then replayed deterministically for rendering.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Canonical "gripper pointing down" orientation (xyzw): 180 degrees about world x.
DOWN_QUAT = np.array([1.0, 0.0, 0.0, 0.0])
POS_SCALE = 0.05  # OSC_POSE: action 1.0 = 5 cm position delta
ROT_SCALE = 0.5  # OSC_POSE: action 1.0 = 0.5 rad rotation delta
GRIPPER_OPEN_WIDTH = 0.075  # finger gap (qpos[0] - qpos[1]) below which the gripper is closing or closed
PLACED_HEIGHT = 0.015  # object origin at most this far above its resting height on the target: it is down
ALIGN_RADIUS = 0.05  # a take-over this close (xy) to the grasp point, below the approach height, crosses over low
ALIGN_CLEARANCE = 0.035  # ... with the eef site this far above the grasp point (fingertips ~1 cm above a bowl's rim)


# ----------------------------------------------------------------------------- small rotation helpers
def quat_to_mat(q: np.ndarray) -> np.ndarray:
    """Rotation matrix from an (x, y, z, w) quaternion."""
    x, y, z, w = np.asarray(q, dtype=np.float64) / np.linalg.norm(q)
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def mat_to_axisangle(r: np.ndarray) -> np.ndarray:
    """Axis-angle vector (angle in [0, pi]) of a rotation matrix."""
    cos = np.clip((np.trace(r) - 1.0) / 2.0, -1.0, 1.0)
    angle = math.acos(cos)
    if angle < 1e-6:
        return np.zeros(3)
    v = np.array([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1]])
    s = np.linalg.norm(v)
    if s < 1e-6:  # angle ~ pi: axis from the diagonal
        axis = np.sqrt(np.maximum((np.diag(r) + 1.0) / 2.0, 0.0))
        k = int(np.argmax(axis))
        for j in range(3):
            if j != k and r[k, j] + r[j, k] < 0:
                axis[j] = -axis[j]
        return axis / np.linalg.norm(axis) * angle
    return v / s * angle


def rotz(theta: float) -> np.ndarray:
    c, s = math.cos(theta), math.sin(theta)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


# ----------------------------------------------------------------------------- task parsing
@dataclass(frozen=True)
class PickPlaceGoal:
    """What to move where: ``obj`` ends ``relation`` (``on``/``in``) ``target``; when the BDDL names a
    region (a site such as ``flat_stove_1_cook_region``), ``target_site`` is it and ``target`` its owner."""

    obj: str
    target: str
    relation: str
    target_site: str | None = None


def parse_goal(env: Any) -> PickPlaceGoal:
    """Read the pick-and-place goal from the env's parsed BDDL problem.

    Accepts ``(On obj target)``, ``(On obj owner_region)`` and ``(In obj owner_contain_region)``; anything
    else (open a drawer, turn on a stove, two-predicate goals) raises ``NotImplementedError`` so callers
    can skip the task.
    """
    inner = getattr(env, "env", env)
    goal = inner.parsed_problem["goal_state"]
    if len(goal) != 1:
        raise NotImplementedError(f"only single-predicate goals are scripted, got {goal}")
    pred = [str(t).lower() for t in goal[0]]
    if pred[0] not in ("on", "in") or len(pred) != 3:
        raise NotImplementedError(f"goal predicate {goal[0]} is not a pick-and-place")
    objects = set(inner.objects_dict) | set(getattr(inner, "fixtures_dict", {}))
    if pred[1] not in inner.objects_dict:
        raise NotImplementedError(f"goal object {pred[1]} is not a movable object")
    if pred[2] in objects:
        return PickPlaceGoal(obj=pred[1], target=pred[2], relation=pred[0])
    sites = getattr(inner, "object_sites_dict", {}) or {}
    if pred[2] in sites:
        parent = getattr(sites[pred[2]], "parent_name", None)
        if parent not in objects:
            raise NotImplementedError(f"region {pred[2]} belongs to {parent!r}, not an object (a table region)")
        return PickPlaceGoal(obj=pred[1], target=str(parent), relation=pred[0], target_site=pred[2])
    raise NotImplementedError(f"goal target {pred[2]} names neither an object nor an object's region")


# ----------------------------------------------------------------------------- geometry from the model
def object_aabb(env: Any, name: str, local: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Axis-aligned bounding box (lo, hi) of an object's collision geoms, in the world frame or
    (``local=True``) in the frame of the object's root body."""
    import mujoco

    inner = getattr(env, "env", env)
    m = inner.sim.model._model
    d = inner.sim.data._data
    root = inner.obj_body_id[name]
    bodies = {root}
    for b in range(m.nbody):  # all descendants of the object's root body
        p = b
        while p > 0 and p not in bodies:
            p = m.body_parentid[p]
        if p in bodies:
            bodies.add(b)
    lo = np.full(3, np.inf)
    hi = np.full(3, -np.inf)
    signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)], dtype=np.float64)
    for g in range(m.ngeom):
        if m.geom_bodyid[g] not in bodies or m.geom_contype[g] == 0 and m.geom_conaffinity[g] == 0:
            continue
        if m.geom_type[g] == mujoco.mjtGeom.mjGEOM_PLANE:
            continue
        centre, half = m.geom_aabb[g][:3], m.geom_aabb[g][3:]
        corners = centre + signs * half
        world = d.geom_xpos[g] + corners @ d.geom_xmat[g].reshape(3, 3).T
        if local:
            world = (world - d.xpos[root]) @ d.xmat[root].reshape(3, 3)
        lo = np.minimum(lo, world.min(axis=0))
        hi = np.maximum(hi, world.max(axis=0))
    if not np.all(np.isfinite(lo)):
        pos = d.xpos[root]
        return pos - 0.02, pos + 0.02
    return lo, hi


# ----------------------------------------------------------------------------- the expert
#: Rim angles tried in turn (the first is the default): the side facing the robot (-x, the shortest reach
#: when carrying to a far plate), +y, -y, then the far side.
RIM_ANGLES = (math.pi, math.pi / 2, -math.pi / 2, 0.0)


@dataclass
class ExpertParams:
    """Per-attempt knobs; ``sample`` draws a variant for the search."""

    rim_angle: float = math.pi  # bowls: where on the rim to grasp (angle about z; fingers close radially)
    grasp_depth: float = 0.025  # how far below the object's top the fingertips go
    speed: float = 1.0  # scales the free-space action magnitude
    lift_clearance: float = 0.12  # carry height above the higher of grasp and place heights
    place_clearance: float = 0.02  # object bottom above the target's top when releasing
    yaw: float = 0.0  # gripper yaw about z relative to DOWN (fingers along rotated y)
    base_angle: float | None = None  # the un-jittered rim angle this variant came from (bookkeeping)

    @classmethod
    def sample(cls, rng: np.random.Generator, attempt: int,
               angle_order: list[float] | None = None) -> ExpertParams:
        """Attempt 0 is the default grasp at the first angle of ``angle_order``; later attempts cycle
        through the angles with jittered knobs. ``angle_order`` lets a caller put the rim angle that
        worked before for this task first (a drawer wall blocks some sides)."""
        angles = list(angle_order) if angle_order else list(RIM_ANGLES)
        if attempt == 0:
            return cls(rim_angle=angles[0])
        a = angles[attempt % len(angles)] + rng.uniform(-0.3, 0.3)
        return cls(
            rim_angle=a,
            grasp_depth=float(rng.uniform(0.018, 0.03)),
            speed=float(rng.uniform(0.7, 1.0)),
            lift_clearance=float(rng.uniform(0.08, 0.15)),
            place_clearance=float(rng.uniform(0.01, 0.03)),
        )


@dataclass
class _Phase:
    name: str
    steps: int = 0


@dataclass
class ScriptedExpert:
    """Closed-loop pick-and-place controller. Call ``act(obs)`` once per env step."""

    env: Any
    goal: PickPlaceGoal
    params: ExpertParams = field(default_factory=ExpertParams)

    def __post_init__(self) -> None:
        self.phase = _Phase("approach")
        self.done = False
        self.failed = False  # set with ``done`` when the attempt cannot succeed any more (saves search time)
        self.fail_reason = ""
        self._grasp_offset: np.ndarray | None = None  # eef - object position at grasp time
        self._plan()

    @classmethod
    def take_over(cls, env: Any, goal: PickPlaceGoal, obs: dict[str, np.ndarray],
                  params: ExpertParams | None = None, carry_z: float | None = None) -> ScriptedExpert:
        """An expert that takes control in the middle of someone else's episode (a DAgger label).

        Why: a policy that drifts off the demonstrations' states never saw what the expert does there, so its
        errors compound; the expert's action from the states the policy actually visits is the correction
        (DAgger). The phase is inferred from the state: holding the object (both finger pads touch it) ->
        ``lift`` below the carry height, ``carry``, or ``lower`` once above the place point; not holding it ->
        ``grasp`` at the grasp point, ``descend`` right above it, else ``approach`` (which opens the gripper
        first, so a missed grasp is retried). For a bowl the rim point nearest the hand is grasped when the
        hand is already close (within 8 cm), as a policy half-way through a grasp has picked its side.
        ``carry_z``: the carry height an expert planned before anyone moved the object (the first query's plan, as
        in a demonstration); without it the carry height is planned from the place point alone.
        """
        p = params or ExpertParams()
        inner = getattr(env, "env", env)
        eef = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
        obj_pos = np.asarray(obs[f"{goal.obj}_pos"], dtype=np.float64)
        off = eef[:2] - obj_pos[:2]
        if params is None and "bowl" in goal.obj and float(np.linalg.norm(off)) < 0.08:
            bearing = math.atan2(off[1], off[0])
            p = ExpertParams(rim_angle=min(RIM_ANGLES, key=lambda a: abs(_wrap_pi(a - bearing))))
        ex = cls(env, goal, p)
        q = np.asarray(obs["robot0_gripper_qpos"], dtype=np.float64)
        width = float(q[0] - q[-1])  # Panda fingers: ~0.08 open, ~0.004 closed on nothing
        place_xy_err = float(np.linalg.norm(ex._place_xy(obs) - obj_pos[:2]))
        # where ``lower`` puts the object's origin: resting on the target (what the goal checks)
        above_place = float(obj_pos[2] - (ex.place_obj_bottom + ex.origin_above_bottom))
        placed = place_xy_err < 0.03 and above_place < PLACED_HEIGHT
        if holding(inner, goal.obj):
            ex._grasp_offset = eef - obj_pos
            obj_h = float(ex.obj_hi[2] - ex.obj_lo[2])
            # the object is in the air: carry it over the place point at the demonstrations' height
            ex.carry_z = carry_z if carry_z is not None else ex.place_obj_bottom + obj_h + p.lift_clearance
            if placed:
                ex._next("release")  # it is down: a lower phase restarted at every query would never let go
            elif place_xy_err < 0.05:
                # lowering corrects the remaining xy error on the way down (a carried bowl swings ~2.3 cm)
                ex._next("lower")
            elif eef[2] < ex.carry_z - 0.03:
                ex._next("lift")
            else:
                ex._next("carry")
            return ex
        if placed:
            ex._next("retreat")  # released on the target: move away, never grasp it again
            return ex
        d = float(np.linalg.norm(eef - ex.grasp_pos))
        d_xy = float(np.linalg.norm(eef[:2] - ex.grasp_pos[:2]))
        dz = float(eef[2] - ex.grasp_pos[2])
        if d < 0.02 and (width < GRIPPER_OPEN_WIDTH or d < 0.015):
            # at the grasp point (the descent stalls ~1.2 cm above it on a bowl's rim): close, or keep closing
            ex._next("grasp")
            ex.phase.steps = int(np.clip((GRIPPER_OPEN_WIDTH - width) / GRIPPER_OPEN_WIDTH * 10, 0, 9))
        elif d_xy < (0.02 if dz < 0.07 else 0.012) and -0.01 < dz < 0.095:
            # below the approach height a little xy drift does not send the hand back up (approach <-> descend
            # would alternate from query to query)
            ex._next("descend")
            ex.phase.steps = 20  # at most 20 more steps of a stalled descent, as the demonstrations' ~40 in all
        elif d_xy < ALIGN_RADIUS and -0.01 < dz < 0.06 and width > 0.06:
            # come down beside the grasp point with the gripper open (a policy's commonest miss: hovering 2-5 cm off
            # the rim for many queries): cross over just above the rim, not back up to the approach height -- from
            # here ``approach`` rose ~8 cm and came down again, a motion no demonstration shows (DAgger round 1
            # labels were 64% ``approach``; docs/dagger.md)
            ex._next("align")
        return ex

    # -- planning from the current (post-settling) state
    def _plan(self) -> None:
        p = self.params
        lo, hi = object_aabb(self.env, self.goal.obj)
        self.obj_lo, self.obj_hi = lo, hi
        inner = getattr(self.env, "env", self.env)
        origin = np.array(inner.sim.data.body_xpos[inner.obj_body_id[self.goal.obj]])
        self.origin_above_bottom = float(origin[2] - lo[2])  # ``<obj>_pos`` is this body origin
        centre = (lo + hi) / 2.0
        self.is_bowl = "bowl" in self.goal.obj
        if self.is_bowl:
            # The rim point in the bowl's own frame, so a bowl resting tilted (on a ramekin) is handled.
            llo, lhi = object_aabb(self.env, self.goal.obj, local=True)
            radius = max(lhi[0] - llo[0], lhi[1] - llo[1]) / 2.0 - 0.008
            lc = (llo + lhi) / 2.0
            rmat = inner.sim.data.body_xmat[inner.obj_body_id[self.goal.obj]].reshape(3, 3)
            body_yaw = math.atan2(rmat[1, 0], rmat[0, 0])
            rim_angle = p.rim_angle
            axis_z = rmat[:, 2]
            if axis_z[2] < math.cos(math.radians(15)):
                # A tilted bowl (one that slid off a ramekin leans at ~50 degrees): only the rim points on the
                # tilt axis keep a near-vertical wall under a top-down grasp, so snap to the nearer one.
                tilt_dir = math.atan2(axis_z[1], axis_z[0])
                cands = (tilt_dir + math.pi / 2, tilt_dir - math.pi / 2)
                rim_angle = min(cands, key=lambda c: abs(_wrap_pi(c - p.rim_angle)))
            self.rim_angle = rim_angle
            # the rim point's local angle: undo the body's yaw (approximate for tilted bodies, exact upright)
            phi = rim_angle - body_yaw
            rim_local = np.array([lc[0] + radius * math.cos(phi), lc[1] + radius * math.sin(phi), lhi[2]])
            rim_world = origin + rmat @ rim_local
            grasp_xy = rim_world[:2]
            # fingers must close radially: the finger axis (rotated y) along the rim direction
            self.yaw = _wrap(rim_angle - math.pi / 2)
            hi = hi.copy()
            hi[2] = rim_world[2]  # grasp depth is measured from the rim at the grasp point
        else:
            grasp_xy = centre[:2]
            ext = hi[:2] - lo[:2]
            self.yaw = math.pi / 2 if ext[1] > ext[0] + 0.01 else 0.0  # close across the narrower side
            self.yaw = _wrap(self.yaw + p.yaw)
        # eef site sits ~1.2 cm above the fingertips
        self.grasp_pos = np.array([grasp_xy[0], grasp_xy[1], hi[2] - p.grasp_depth + 0.012])
        self.grasp_pos[2] = max(self.grasp_pos[2], lo[2] + 0.012 + 0.008)
        tlo, thi = object_aabb(self.env, self.goal.target)
        self.target_lo, self.target_hi = tlo, thi
        self.target_centre = (tlo + thi) / 2.0
        obj_h = hi[2] - lo[2]
        # release with the object's bottom just above the target's top (a container's rim for ``in``)
        self.place_obj_bottom = thi[2] + p.place_clearance
        self.carry_z = max(hi[2], self.place_obj_bottom + obj_h) + p.lift_clearance
        self.target_rot = quat_to_mat(DOWN_QUAT) if self.yaw == 0 else rotz(self.yaw) @ quat_to_mat(DOWN_QUAT)

    # -- control
    def _move(self, obs: dict[str, np.ndarray], target: np.ndarray, gripper: float,
              max_action: float) -> np.ndarray:
        eef = obs["robot0_eef_pos"]
        err = target - eef
        a_pos = err / POS_SCALE * 1.5
        n = np.linalg.norm(a_pos)
        if n > max_action:
            a_pos = a_pos / n * max_action
        a_rot = np.clip(self._rot_delta(obs) / ROT_SCALE * 1.0, -0.5, 0.5)
        return np.concatenate([a_pos, a_rot, [gripper]]).astype(np.float32)

    def _rot_delta(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Axis-angle (rad) from the hand's orientation to the planned grasp orientation."""
        return mat_to_axisangle(self.target_rot @ quat_to_mat(obs["robot0_eef_quat"]).T)

    def _place_xy(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """Where the object's origin should end up in xy: the target region's site when the goal names
        one, else the target body's origin (what ``On`` checks, within 3 cm) for ``on``, else the
        container's bounding-box centre."""
        if self.goal.target_site is not None:
            inner = getattr(self.env, "env", self.env)
            return np.asarray(inner.sim.data.get_site_xpos(self.goal.target_site)[:2], dtype=np.float64)
        if self.goal.relation == "on" and f"{self.goal.target}_pos" in obs:
            return np.asarray(obs[f"{self.goal.target}_pos"][:2], dtype=np.float64)
        return self.target_centre[:2]

    def _next(self, name: str) -> None:
        self.phase = _Phase(name)

    def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
        """One action (7,) in the env convention (gripper -1 open, +1 close)."""
        p = self.params
        ph = self.phase
        ph.steps += 1
        eef = obs["robot0_eef_pos"]
        obj_pos = obs[f"{self.goal.obj}_pos"]
        fast = 1.0 * p.speed
        slow = 0.45 * p.speed
        if ph.name == "approach":
            if ph.steps % 5 == 1:  # objects may still be settling (a bowl sliding off a ramekin): re-plan
                self._plan()
            tgt = self.grasp_pos + np.array([0, 0, 0.08])
            tgt[2] = max(tgt[2], eef[2] - 0.02) if ph.steps < 5 else tgt[2]
            a = self._move(obs, tgt, -1.0, fast)
            if np.linalg.norm(tgt - eef) < 0.012 or ph.steps > 80:
                self._plan()
                self._next("descend")
            return a
        if ph.name == "align":
            tgt = self.grasp_pos.copy()
            tgt[2] = max(float(eef[2]), self.grasp_pos[2] + ALIGN_CLEARANCE)
            if tgt[2] - eef[2] > 0.01:
                tgt[:2] = eef[:2]  # below the clearance height: straight up first, or the fingers drag the rim
            a = self._move(obs, tgt, -1.0, slow)
            # down only once the fingers straddle the rim: a hand still turning lands a finger on it and tips the
            # bowl (~45 degrees, seen when descending while 90 degrees off)
            if (np.linalg.norm(tgt[:2] - eef[:2]) < 0.008 and float(np.linalg.norm(self._rot_delta(obs))) < 0.15) or ph.steps > 40:
                self._next("descend")
            return a
        if ph.name == "descend":
            a = self._move(obs, self.grasp_pos, -1.0, slow)
            if np.linalg.norm(self.grasp_pos - eef) < 0.007 or ph.steps > 40:
                self._next("grasp")
            return a
        if ph.name == "grasp":
            a = self._move(obs, self.grasp_pos, 1.0, slow)
            if ph.steps >= 10:
                self._grasp_offset = eef - obj_pos
                self._next("lift")
            return a
        if ph.name == "lift":
            if ph.steps == 1:
                self._lift_tgt = np.array([eef[0], eef[1], self.carry_z])
                self._obj_z0 = float(obj_pos[2])
            tgt = self._lift_tgt
            a = self._move(obs, tgt, 1.0, fast * 0.8)
            lifted = float(obj_pos[2]) - self._obj_z0
            if eef[2] - self.grasp_pos[2] > 0.05 and lifted < 0.02:
                self.failed, self.done = True, True  # the object stayed behind: the grasp missed
                self.fail_reason = "grasp missed"
            elif abs(tgt[2] - eef[2]) < 0.02 or ph.steps > 40:
                self._next("carry")
            return a
        if ph.name == "carry":
            if np.linalg.norm((eef - obj_pos) - self._grasp_offset) > 0.05:
                self.failed, self.done = True, True
                self.fail_reason = "object slipped"
            # closed loop on the object itself: move the hand by the object's remaining xy error
            tgt = eef.copy()
            tgt[:2] += self._place_xy(obs) - obj_pos[:2]
            tgt[2] = self.carry_z
            a = self._move(obs, tgt, 1.0, fast)
            if np.linalg.norm(self._place_xy(obs) - obj_pos[:2]) < 0.008 or ph.steps > 80:
                self._next("lower")
            return a
        if ph.name == "lower":
            tgt = eef.copy()
            tgt[:2] += self._place_xy(obs) - obj_pos[:2]
            tgt[2] += (self.place_obj_bottom + self.origin_above_bottom) - obj_pos[2]
            a = self._move(obs, tgt, 1.0, slow)
            if np.linalg.norm(tgt - eef) < 0.01 or ph.steps > 50:
                self._next("release")
            return a
        if ph.name == "release":
            a = self._move(obs, eef, -1.0, slow)
            a[:6] = 0.0
            if ph.steps >= 8:
                self._next("retreat")
            return a
        # retreat (and hold)
        tgt = np.array([eef[0], eef[1], self.carry_z]) if ph.steps == 1 else self._retreat_tgt
        self._retreat_tgt = tgt
        if ph.steps > 30:
            self.done = True
        return self._move(obs, tgt, -1.0, slow)


def holding(inner: Any, obj: str) -> bool:
    """True when both of the gripper's finger pads touch ``obj`` (robosuite's grasp check)."""
    return bool(inner._check_grasp(gripper=inner.robots[0].gripper, object_geoms=inner.objects_dict[obj]))


def _wrap_pi(a: float) -> float:
    """Angle in (-pi, pi]."""
    return math.atan2(math.sin(a), math.cos(a))


def _wrap(a: float) -> float:
    """Angle in (-pi/2, pi/2]: a parallel gripper is symmetric under a half turn."""
    while a > math.pi / 2:
        a -= math.pi
    while a <= -math.pi / 2:
        a += math.pi
    return a


@dataclass
class Rollout:
    """Result of one expert attempt from a fixed init state."""

    success: bool
    actions: np.ndarray  # (T, 7) float32, the recorded part (after the wait steps): what was executed
    steps: int
    success_step: int | None
    params: ExpertParams
    labels: np.ndarray | None = None  # with ``noise``: (T, 7) the actions the expert meant (before the noise)
    phases: list[str] | None = None  # with ``noise``: the expert's phase at each step


def run_expert(env: Any, init_state: np.ndarray, params: ExpertParams, max_steps: int, seed: int = 7,
               wait_steps: int = 10, extra_after_success: int = 0, goal: PickPlaceGoal | None = None,
               noise: np.ndarray | None = None) -> Rollout:
    """Reset to ``init_state`` (seed, reset, set_init_state, wait steps) and run the expert.

    The wait steps mirror the evaluation protocol and are not part of ``actions``; ``max_steps`` counts
    the recorded steps, the same budget an evaluated policy gets. Stops at env ``done`` (plus
    ``extra_after_success`` steps, so a demo shows the release settling) or when the budget runs out.
    ``noise`` (``[>= max_steps, 7]``, DART: :mod:`client.libero.dart`) is added to every action before it is
    executed (clipped to [-1, 1]); ``actions`` are then the executed ones and ``labels`` the expert's own.
    """
    from client.libero.protocol import WAIT_ACTION

    env.seed(seed)
    env.reset()
    obs = env.set_init_state(init_state)
    for _ in range(wait_steps):
        obs, _, _, _ = env.step(WAIT_ACTION.astype(np.float64))
    expert = ScriptedExpert(env, goal or parse_goal(env), params)
    actions: list[np.ndarray] = []
    labels: list[np.ndarray] = []
    phases: list[str] = []
    success_step = None
    for t in range(max_steps):
        a = expert.act(obs)
        if expert.failed:
            break
        if noise is not None:
            labels.append(a)
            phases.append(expert.phase.name)
            a = np.clip(a + noise[t], -1.0, 1.0).astype(np.float32)
        actions.append(a)
        obs, _, done, _ = env.step(a.astype(np.float64))
        if done and success_step is None:
            success_step = t + 1
        if success_step is not None and t + 1 >= success_step + extra_after_success:
            break
    executed = np.asarray(actions, np.float32).reshape(-1, 7)
    return Rollout(success_step is not None, executed, len(actions), success_step, params,
                   labels=None if noise is None else np.asarray(labels, np.float32).reshape(-1, 7),
                   phases=None if noise is None else phases)
