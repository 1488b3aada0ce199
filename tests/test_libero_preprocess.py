"""The LIBERO client's ``--preprocess`` image paths against upstream OpenVLA's harness, no simulator needed.

Upstream (``experiments/robot/libero/libero_utils.py``): ``img[::-1, ::-1]`` (LIBERO renders upside down), then
``tf.image.encode_jpeg`` (quality 95 by default) and decode, then ``tf.image.resize(..., "lanczos3",
antialias=True)`` to 224x224, rounded and clipped to uint8. The expected outputs below are computed independently:
a numpy flip, imageio's JPEG codec and a numpy lanczos3 resampler written from TF's scale-and-translate semantics.

The ``gr00t`` preset mirrors Isaac-GR00T's ``examples/Libero/eval/run_libero_eval.py`` (GR00T N1.5): the env renders
256x256, ``get_libero_image`` flips both cameras ``[::-1, ::-1]`` and nothing else happens on the client (no resize,
no JPEG); the expected frames are computed with PIL's ``ROTATE_180`` and ``np.rot90``.
"""

from __future__ import annotations

import json

import imageio.v3 as iio
import numpy as np
import pytest
from PIL import Image

from client.libero.config import EvalConfigError, config_from_args
from client.libero.env import extract_obs
from client.libero.protocol import (
    GR00T_IMAGE_SIZE,
    OPENVLA_IMAGE_SIZE,
    PREPROCESS_DESCRIPTIONS,
    preprocess_image,
    rotate_180,
)
from client.libero.results import ResultsFile

pytestmark = pytest.mark.libero


def _lanczos3(x: np.ndarray) -> np.ndarray:
    return np.where(np.abs(x) < 3.0, np.sinc(x) * np.sinc(x / 3.0), 0.0)


def _weights(n_in: int, n_out: int) -> np.ndarray:
    """``[n_out, n_in]`` antialiased lanczos3 weights: output pixel ``i`` samples input coordinate
    ``(i + 0.5) * n_in / n_out`` (pixel ``j``'s centre at ``j + 0.5``), the kernel widened by the downscale factor,
    each row normalised over the in-range pixels."""
    inv = n_in / n_out
    kscale = max(inv, 1.0)
    centres = (np.arange(n_out) + 0.5) * inv
    w = _lanczos3((np.arange(n_in)[None, :] + 0.5 - centres[:, None]) / kscale)
    return w / w.sum(axis=1, keepdims=True)


def _reference_lanczos(img: np.ndarray, size: int) -> np.ndarray:
    wy, wx = _weights(img.shape[0], size), _weights(img.shape[1], size)
    rows = np.einsum("oh,hwc->owc", wy, img.astype(np.float64))
    out = np.einsum("owc,pw->opc", rows, wx)
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def _reference_openvla(raw: np.ndarray) -> np.ndarray:
    upright = raw[::-1, ::-1]
    decoded = iio.imread(iio.imwrite("<bytes>", upright, extension=".jpg", quality=95), extension=".jpg")
    return _reference_lanczos(decoded, OPENVLA_IMAGE_SIZE)


def _render_like(size: int, seed: int = 0) -> np.ndarray:
    """A smooth scene with a few hard edges, rendered 'upside down' (the top-left feature ends up bottom-right)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    img = np.stack([200 * xx / size + 20, 180 * yy / size + 30, 120 + 60 * np.sin((xx + yy) / 11.0)], axis=-1)
    for _ in range(4):
        y, x, r = rng.integers(0, size - 40, 3)
        img[y : y + 20 + r % 20, x : x + 30] = rng.integers(0, 255, 3)
    img[:16, :16] = (255, 0, 0)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def _raw_obs(size: int) -> dict[str, np.ndarray]:
    return {
        "agentview_image": _render_like(size, 0),
        "robot0_eye_in_hand_image": _render_like(size, 1),
        "robot0_eef_pos": np.zeros(3),
        "robot0_eef_quat": np.array([0.0, 0.0, 0.0, 1.0]),
        "robot0_gripper_qpos": np.zeros(2),
    }


@pytest.mark.parametrize("size", [256, 128])
def test_openvla_preset_matches_upstream_harness(size: int) -> None:
    raw = _raw_obs(size)
    obs = extract_obs(raw, "put the bowl on the plate", "openvla")
    for key, cam in (("image", "agentview_image"), ("wrist_image", "robot0_eye_in_hand_image")):
        got = obs[key]
        assert got.shape == (224, 224, 3) and got.dtype == np.uint8
        diff = np.abs(got.astype(int) - _reference_openvla(raw[cam]).astype(int))
        assert diff.max() <= 1, diff.max()  # float rounding at .5 boundaries only
        assert diff.mean() < 0.05
    # the flip happened: the red top-left block of the render is at the bottom-right of the upright image
    assert obs["image"][-3, -3, 0] > 200 and obs["image"][-3, -3, 1] < 60


def test_openvla_preset_applies_a_lossy_jpeg_round_trip() -> None:
    img = rotate_180(_render_like(224))
    out = preprocess_image(img, "openvla")  # already 224: only the JPEG round trip changes it
    assert out.shape == img.shape and not np.array_equal(out, img)
    assert np.abs(out.astype(int) - img.astype(int)).mean() < 3.0


def test_none_preset_is_todays_path() -> None:
    raw = _raw_obs(256)
    obs = extract_obs(raw, "x")
    np.testing.assert_array_equal(obs["image"], raw["agentview_image"][::-1, ::-1])
    np.testing.assert_array_equal(extract_obs(raw, "x", "none")["wrist_image"],
                                  raw["robot0_eye_in_hand_image"][::-1, ::-1])
    with pytest.raises(ValueError, match="preprocess"):
        preprocess_image(raw["agentview_image"], "sharpen")


def test_flag_parses_validates_and_is_recorded_in_results(tmp_path) -> None:  # noqa: ANN001
    assert config_from_args(["libero_spatial", "--headless"]).preprocess == "auto"  # the server says (see below)
    cfg = config_from_args(["libero_spatial", "--headless", "--preprocess", "openvla"])
    assert cfg.preprocess == "openvla"
    with pytest.raises(EvalConfigError, match="--preprocess"):
        config_from_args(["libero_spatial", "--headless", "--preprocess", "gr00t-ish"])
    path = tmp_path / "results.json"
    ResultsFile(path, "libero_spatial", cfg.to_dict(), {}).write()
    block = json.loads(path.read_text())["config"]
    assert block["preprocess"] == "openvla"
    assert block["preprocessing"] == PREPROCESS_DESCRIPTIONS["openvla"]
    assert "lanczos3" in block["preprocessing"] and "center_crop" in block["preprocessing"]


def test_gr00t_preset_matches_upstream_harness() -> None:
    raw = _raw_obs(256)
    obs = extract_obs(raw, "put the bowl on the plate", "gr00t")
    for key, cam in (("image", "agentview_image"), ("wrist_image", "robot0_eye_in_hand_image")):
        got = obs[key]
        assert GR00T_IMAGE_SIZE == 256
        assert got.shape == (256, 256, 3) and got.dtype == np.uint8 and got.flags["C_CONTIGUOUS"]
        expected = np.asarray(Image.fromarray(raw[cam]).transpose(Image.Transpose.ROTATE_180))
        np.testing.assert_array_equal(got, expected)  # bit-exact: a flip only, no resize, no JPEG
        np.testing.assert_array_equal(got, np.rot90(raw[cam], 2))
    assert obs["image"][-3, -3, 0] > 200 and obs["image"][-3, -3, 1] < 60  # red top-left block now bottom-right
    # same pixels as 'none' at 256, unlike openvla's 224 JPEG'd frames; only the results file tells them apart
    np.testing.assert_array_equal(obs["image"], extract_obs(raw, "x", "none")["image"])
    assert extract_obs(raw, "x", "openvla")["image"].shape == (224, 224, 3)
    assert PREPROCESS_DESCRIPTIONS["gr00t"] != PREPROCESS_DESCRIPTIONS["none"]


def test_gr00t_preset_refuses_other_render_sizes() -> None:
    with pytest.raises(ValueError, match="--resolution 256"):
        preprocess_image(rotate_180(_render_like(128)), "gr00t")


def test_gr00t_flag_parses_and_is_recorded_in_results(tmp_path) -> None:  # noqa: ANN001
    cfg = config_from_args(["libero_spatial", "--headless", "--preprocess", "gr00t"])
    assert cfg.preprocess == "gr00t" and cfg.resolution == 256
    with pytest.raises(EvalConfigError, match="--resolution 256"):
        config_from_args(["libero_spatial", "--headless", "--preprocess", "gr00t", "--resolution", "128"])
    path = tmp_path / "results.json"
    ResultsFile(path, "libero_spatial", cfg.to_dict(), {}).write()
    block = json.loads(path.read_text())["config"]
    assert block["preprocess"] == "gr00t"
    assert block["preprocessing"] == PREPROCESS_DESCRIPTIONS["gr00t"]
    assert "run_libero_eval.py" in block["preprocessing"] and "no resize" in block["preprocessing"]


# ---------------------------------------------------------------------------------------------- --preprocess auto
def test_auto_follows_the_preprocessing_the_real_server_advertises() -> None:
    from client.libero.evaluate import settle_from_server
    from client.testing import ServerProcess

    with ServerProcess(["--policy-option", "libero_preprocess=openvla"]) as server:
        cfg = config_from_args(["libero_spatial", "--headless", "--port", str(server.port)])
        assert cfg.preprocess == "auto"  # the default
        settle_from_server(cfg)
        assert cfg.preprocess == "openvla" and cfg.extra["preprocess_from"] == "server metadata"
        assert cfg.to_dict()["preprocessing"] == PREPROCESS_DESCRIPTIONS["openvla"]
        explicit = config_from_args(["libero_spatial", "--headless", "--port", str(server.port), "--preprocess", "none"])
        settle_from_server(explicit)  # a flag always wins
        assert explicit.preprocess == "none"
    with ServerProcess(["--policy-option", "libero_preprocess=gr00t"]) as server:
        cfg = config_from_args(["libero_spatial", "--headless", "--port", str(server.port), "--resolution", "128"])
        with pytest.raises(EvalConfigError, match="--resolution 256"):  # gr00t's harness renders 256x256
            settle_from_server(cfg)


def test_auto_without_a_server_stops_at_start_naming_the_flag() -> None:
    from client.libero.evaluate import settle_from_server
    from client.testing import free_port

    cfg = config_from_args(["libero_spatial", "--headless", "--port", str(free_port()), "--timeout", "0.3"])
    with pytest.raises(EvalConfigError, match=r"--preprocess auto: the server at 127\.0\.0\.1:\d+ did not answer"):
        settle_from_server(cfg)


class _ScriptedMetadata:
    """Stands in for PolicyClient: answers ``metadata`` from a script (unit test of the waiting logic)."""

    def __init__(self, answers: list[dict]) -> None:
        self.answers = answers
        self.calls = 0

    def __call__(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN204 - the PolicyClient constructor
        return self

    def __enter__(self):  # noqa: ANN204
        return self

    def __exit__(self, *exc) -> None:  # noqa: ANN002
        pass

    def metadata(self) -> dict:
        self.calls += 1
        return self.answers[min(self.calls, len(self.answers)) - 1]


def test_auto_waits_for_a_loading_server_and_rejects_unknown_presets(monkeypatch: pytest.MonkeyPatch) -> None:
    import client.libero.evaluate as ev
    import client.policy_client as pc

    script = _ScriptedMetadata([{"status": "loading"}, {"status": "loading"},
                                {"status": "ready", "policy": "gr00t", "preprocess": "gr00t"}])
    monkeypatch.setattr(pc, "PolicyClient", script)
    monkeypatch.setattr(ev.time, "sleep", lambda s: None)
    cfg = config_from_args(["libero_spatial", "--headless"])
    ev.settle_from_server(cfg)
    assert (cfg.preprocess, script.calls) == ("gr00t", 3)

    monkeypatch.setattr(pc, "PolicyClient", _ScriptedMetadata([{"status": "loading"}]))
    cfg = config_from_args(["libero_spatial", "--headless", "--server-wait", "0"])
    with pytest.raises(EvalConfigError, match="is 'loading', not ready"):
        ev.settle_from_server(cfg)

    monkeypatch.setattr(pc, "PolicyClient", _ScriptedMetadata([{"status": "ready", "preprocess": "pi0"}]))
    with pytest.raises(EvalConfigError, match="advertises preprocess 'pi0'"):
        ev.settle_from_server(config_from_args(["libero_spatial", "--headless"]))

    monkeypatch.setattr(pc, "PolicyClient", _ScriptedMetadata([{"status": "ready"}]))  # an older server
    cfg = config_from_args(["libero_spatial", "--headless"])
    ev.settle_from_server(cfg)
    assert cfg.preprocess == "none" and cfg.extra["preprocess_from"].startswith("default")


def test_resume_refuses_a_results_file_recorded_with_another_image_path(tmp_path) -> None:  # noqa: ANN001
    from client.libero.results import ResultsFileError

    path = tmp_path / "results.json"
    ResultsFile(path, "libero_spatial", config_from_args(["libero_spatial", "--headless", "--preprocess", "none"])
                .to_dict(), {}).write()
    same = config_from_args(["libero_spatial", "--headless", "--preprocess", "none", "--trials", "3"])
    ResultsFile(path, "libero_spatial", same.to_dict(), {}, resume=True)  # other trials: fine
    other = config_from_args(["libero_spatial", "--headless", "--preprocess", "openvla"])
    with pytest.raises(ResultsFileError, match=r"recorded with preprocess 'none', this run would use 'openvla' "
                                               r"\(--preprocess\)"):
        ResultsFile(path, "libero_spatial", other.to_dict(), {}, resume=True)
    with pytest.raises(ResultsFileError, match="for suite 'libero_spatial'"):
        ResultsFile(path, "libero_goal", same.to_dict(), {}, resume=True)
