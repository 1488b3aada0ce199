"""The LIBERO evaluation protocol as data and pure functions (no simulator import).

Kept free of LIBERO/mujoco imports so the gripper conversion, the 8-d state and the
suite constants can be unit-tested (and reused by the recorder) without a simulator.
Numbers follow OpenVLA's ``run_libero_eval.py`` and openpi's ``examples/libero/main.py``.
"""

from __future__ import annotations

import math

import numpy as np

#: Episode step limits per suite (the longest demonstration of each suite plus a margin).
SUITE_MAX_STEPS: dict[str, int] = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
SUITES: tuple[str, ...] = tuple(SUITE_MAX_STEPS)

#: Steps of a do-nothing action after reset so that dropped objects settle before the policy acts.
NUM_WAIT_STEPS = 10
#: The do-nothing action: zero motion, gripper open (-1 in the environment's convention).
WAIT_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float32)

DEFAULT_SEED = 7
ACTION_DIM = 7
STATE_DIM = 8

#: Gripper conventions a server may declare in its metadata.
GRIPPER_LIBERO = "libero"  # env convention already: -1 open, +1 close
GRIPPER_OPENVLA = "openvla"  # [0, 1] with 1 = open (OpenVLA's RLDS data); invert + binarise
GRIPPER_CONVENTIONS = (GRIPPER_LIBERO, GRIPPER_OPENVLA)


def convert_gripper(actions: np.ndarray, convention: str) -> np.ndarray:
    """Return a copy of ``actions`` ([..., 7]) with the gripper in the env convention (-1 open, +1 close).

    ``libero``: the policy already speaks the env convention; values are only clipped to [-1, 1].
    ``openvla``: the policy's gripper is in [0, 1] with 1 = open. It is mapped to [-1, 1]
    (``2g - 1``), binarised with ``sign`` (0.5 -> open, matching OpenVLA), then inverted.
    Motion dimensions are clipped to the controller's [-1, 1] range in both cases.
    """
    a = np.array(actions, dtype=np.float32, copy=True)
    if a.shape[-1] != ACTION_DIM:
        raise ValueError(f"expected actions with last dimension {ACTION_DIM}, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("actions contain NaN or inf")
    if convention == GRIPPER_LIBERO:
        pass
    elif convention == GRIPPER_OPENVLA:
        g = 2.0 * a[..., 6] - 1.0
        g = np.where(g > 0, 1.0, -1.0)  # binarise; exactly 0.5 counts as open (sign(0) -> -1 after inversion)
        a[..., 6] = -g  # invert: 1 (open) -> -1
    else:
        raise ValueError(f"unknown gripper convention {convention!r}; expected one of {GRIPPER_CONVENTIONS}")
    return np.clip(a, -1.0, 1.0).astype(np.float32)


def actions_before_gripper_flip(chunk: np.ndarray, gripper_now: float) -> int:
    """How many of ``chunk``'s actions (env convention) run before its gripper command first flips sign against
    ``gripper_now`` (the command in force); ``len(chunk)`` when it never flips or flips at its first action.

    The client's ``--gripper-confirm`` executes that many and asks again, so the grasp or release is decided on an
    observation taken where it happens rather than up to a chunk earlier. Measured on libero_spatial: the shipped
    OpenVLA-RSD 64/100 with it vs 61/100 without (paired 5 vs 2, p = 0.45), so it stays opt-in: its systematic
    misses are decided before the flip (the arm already past the target, docs/training.md).
    """
    g = np.sign(np.asarray(chunk, dtype=np.float32)[:, 6])
    now = 1.0 if gripper_now > 0 else -1.0
    flips = np.nonzero((g != 0) & (g != now))[0]
    if len(flips) == 0 or flips[0] == 0:
        return len(chunk)
    return int(flips[0])


def quat2axisangle(quat: np.ndarray) -> np.ndarray:
    """Axis-angle (3,) from an (x, y, z, w) quaternion, robosuite's convention (angle in [0, 2*pi])."""
    q = np.asarray(quat, dtype=np.float64)
    w = float(np.clip(q[3], -1.0, 1.0))
    den = math.sqrt(max(1.0 - w * w, 0.0))
    if math.isclose(den, 0.0, abs_tol=1e-12):
        return np.zeros(3, dtype=np.float64)
    return q[:3] * 2.0 * math.acos(w) / den


def state_8d(eef_pos: np.ndarray, eef_quat: np.ndarray, gripper_qpos: np.ndarray) -> np.ndarray:
    """The 8-d proprio state the client sends: eef pos (3), eef axis-angle (3), gripper qpos (2)."""
    return np.concatenate(
        [np.asarray(eef_pos, np.float64).reshape(3), quat2axisangle(eef_quat), np.asarray(gripper_qpos).reshape(2)]
    ).astype(np.float32)


def rotate_180(img: np.ndarray) -> np.ndarray:
    """Rotate an H x W x C image by 180 degrees (LIBERO renders upside down); contiguous copy."""
    return np.ascontiguousarray(img[::-1, ::-1])


def max_steps_for(suite: str) -> int:
    """Step limit for ``suite``; raises a clear error for an unknown suite name."""
    try:
        return SUITE_MAX_STEPS[suite]
    except KeyError:
        raise ValueError(f"unknown suite {suite!r}; expected one of {', '.join(SUITES)}") from None


#: ``--fixtures``: how the fixed furniture (cabinets, stoves: bodies without a free joint) is placed per episode.
FIXTURES_PINNED = "pinned"
FIXTURES_PER_RESET = "per-reset"
FIXTURE_CHOICES = (FIXTURES_PINNED, FIXTURES_PER_RESET)


# -- image preprocessing presets (what the client sends, to match a checkpoint's own evaluation harness) --------
PREPROCESS_NONE = "none"  # the render, rotated 180 degrees, at --resolution (the project's own models)
PREPROCESS_OPENVLA = "openvla"  # upstream OpenVLA's LIBERO harness (experiments/robot/libero/libero_utils.py)
PREPROCESS_GR00T = "gr00t"  # Isaac-GR00T's GR00T N1.5 LIBERO harness (examples/Libero/eval/run_libero_eval.py)
PREPROCESS_CHOICES = (PREPROCESS_NONE, PREPROCESS_OPENVLA, PREPROCESS_GR00T)
#: The client's default: the preset the server advertises in ``metadata["preprocess"]`` (the policy factory sets it
#: per policy kind: a released OpenVLA/OpenVLA-OFT checkpoint -> openvla, GR00T N1.5 -> gr00t, the project's own
#: models -> none); a server that advertises nothing (an older one) gets ``none``.
PREPROCESS_AUTO = "auto"
#: Side of OpenVLA's LIBERO images, and ``tf.image.encode_jpeg``'s default quality (4:2:0 chroma subsampling).
OPENVLA_IMAGE_SIZE = 224
OPENVLA_JPEG_QUALITY = 95
#: Side of the render Isaac-GR00T's LIBERO harness sends (its env is built at 256x256). The server's data config
#: (``LiberoDataConfig``) centre-crops 0.95 and resizes to 224 with bilinear interpolation, and refuses frames
#: whose size differs from the training videos' (256x256), so the client renders and sends exactly this size.
GR00T_IMAGE_SIZE = 256

PREPROCESS_DESCRIPTIONS: dict[str, str] = {
    PREPROCESS_NONE: "rotate 180 degrees; sent at the render resolution",
    PREPROCESS_OPENVLA: (f"rotate 180 degrees; JPEG round trip (quality {OPENVLA_JPEG_QUALITY}, 4:2:0); "
                         f"lanczos3 antialiased resize to {OPENVLA_IMAGE_SIZE}x{OPENVLA_IMAGE_SIZE}, rounded to "
                         "uint8 (upstream OpenVLA LIBERO harness; the 0.9-area centre crop is the server "
                         "policy's center_crop option)"),
    PREPROCESS_GR00T: (f"rotate 180 degrees ([::-1, ::-1]); no resize, no JPEG round trip: the "
                       f"{GR00T_IMAGE_SIZE}x{GR00T_IMAGE_SIZE} uint8 render is sent as is (Isaac-GR00T "
                       "examples/Libero/eval/run_libero_eval.py with its utils.get_libero_image, GR00T N1.5 LIBERO "
                       "fine-tunes; the 0.95 centre crop and bilinear resize to 224x224 are the server's "
                       "LiberoDataConfig video transforms). That harness otherwise differs from the client's "
                       "defaults: it queries every step and executes only the first of the 16 returned actions "
                       "(--replan 1), its step limits are goal 600 and libero_10 1000 (spatial 220, object 280, "
                       "libero_90 400 as here), 10 wait steps, 5 trials per task, env.seed(0); its gripper mapping "
                       "sign(1 - 2g) is the openvla convention"),
}


def jpeg_round_trip(img: np.ndarray, quality: int = OPENVLA_JPEG_QUALITY) -> np.ndarray:
    """Encode to JPEG and decode back, as OpenVLA's RLDS builder stored the training frames."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).save(buf, format="JPEG", quality=quality,
                                                                    subsampling="4:2:0")
    buf.seek(0)
    with Image.open(buf) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8)


def resize_lanczos(img: np.ndarray, size: int) -> np.ndarray:
    """Antialiased lanczos3 resize to ``size x size`` in float, then rounded and clipped to uint8 (the same
    arithmetic as ``tf.image.resize(method="lanczos3", antialias=True)`` followed by round + clip)."""
    from PIL import Image

    if img.shape[:2] == (size, size):
        return np.ascontiguousarray(img, dtype=np.uint8)
    chans = [np.asarray(Image.fromarray(np.ascontiguousarray(img[..., c], dtype=np.float32), mode="F")
                        .resize((size, size), Image.LANCZOS)) for c in range(img.shape[-1])]
    return np.clip(np.round(np.stack(chans, axis=-1)), 0, 255).astype(np.uint8)


def preprocess_image(img: np.ndarray, preset: str) -> np.ndarray:
    """An already rotated (upright) camera image through ``preset``'s path (see ``PREPROCESS_DESCRIPTIONS``)."""
    if preset == PREPROCESS_NONE:
        return img
    if preset == PREPROCESS_OPENVLA:
        return resize_lanczos(jpeg_round_trip(img), OPENVLA_IMAGE_SIZE)
    if preset == PREPROCESS_GR00T:
        if img.shape[:2] != (GR00T_IMAGE_SIZE, GR00T_IMAGE_SIZE):
            raise ValueError(f"the {PREPROCESS_GR00T!r} preset sends the {GR00T_IMAGE_SIZE}x{GR00T_IMAGE_SIZE} "
                             f"render unchanged; got an image of {img.shape[1]}x{img.shape[0]} "
                             f"(render with --resolution {GR00T_IMAGE_SIZE})")
        return np.ascontiguousarray(img, dtype=np.uint8)
    raise ValueError(f"unknown preprocess preset {preset!r}; expected one of {PREPROCESS_CHOICES}")
