"""The one policy factory: typed ``--policy-option`` options, build order, the Policy interface, the dry run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import models
from server.__main__ import main as server_main
from server.app import PolicyServer
from server.config import ConfigError, ServerConfig
from server.policies import (
    DryRunRequested,
    Policy,
    PolicyContext,
    PolicyOutput,
    PolicySpec,
    create_policy,
    describe_policies,
    policy_spec,
    register_policy,
)
from server.policies import registry as registry_module
from server.policies.builtin import GR00TOptions, OpenVLAOptions
from server.policies.debug import DebugPolicy
from server.policies.options import CalibrationOptions

REPO = Path(__file__).resolve().parents[1]
PY = str(REPO / ".venv" / "bin" / "python") if (REPO / ".venv" / "bin" / "python").exists() else sys.executable
DRY = re.compile(r"^\[GR00T-DUQUANT\]\[DRYRUN\] (\S+): Linear\((\d+)->(\d+)\) W(\d+) A(\d+|off)\b")
TOTAL = re.compile(r"^\[GR00T-DUQUANT\] Dry-run total layers listed: (\d+)$")


@pytest.fixture(autouse=True)
def _no_duquant_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("GR00T_DUQUANT_")]:
        monkeypatch.delenv(key)


@pytest.fixture
def temporary_policy() -> Iterator[Any]:
    """Register test-only declarations and remove them afterwards (the registry is process-wide)."""
    added: list[str] = []

    def add(spec: PolicySpec) -> PolicySpec:
        added.append(spec.name)
        return register_policy(spec)

    yield add
    for name in added:
        registry_module._REGISTRY.pop(name, None)


class RecordingPolicy(Policy):
    """Remembers what its constructor was given and what the model looked like at that moment."""

    name = "recording"

    def __init__(self, model: Any, quantization: dict[str, Any], log: list[str]) -> None:
        from quant import quantized_layers

        self.model = model
        self.quantization = quantization
        self.layers_at_construction = len(quantized_layers(model)) if model is not None else 0
        log.append("wrap")

    def infer(self, observations: list[dict[str, Any]]) -> list[PolicyOutput]:
        return [PolicyOutput(actions=np.zeros((1, 7), np.float32)) for _ in observations]

    def metadata(self) -> dict[str, Any]:
        return {"policy": self.name, "quantization": self.quantization}


# ---------------------------------------------------------------------------------------------- typed options
@pytest.mark.parametrize(("policy", "options", "needle"), [
    ("debug", {"horizon": "zero"}, "--policy-option horizon='zero': expected an integer"),
    ("debug", {"horizon": "0"}, "--policy-option horizon='0': must be >= 1"),
    ("debug", {"delay_ms": "-5"}, "--policy-option delay_ms='-5': must be >= 0"),
    ("gr00t", {"gripper_convention": "left"}, "--policy-option gripper_convention='left': must be one of libero"),
    ("openvla", {"center_crop": "maybe"}, "--policy-option center_crop='maybe': expected a boolean"),
    ("openvla-rsd", {"calib_n": "many"}, "--policy-option calib_n='many': expected an integer"),
    ("openvla-rsd", {"calib_data": "/nonexistent/*.hdf5"}, "calib_data='/nonexistent/*.hdf5': no files match"),
])
def test_bad_option_values_name_the_option(policy: str, options: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(needle)):
        create_policy(ServerConfig(policy=policy, policy_options=options))


def test_unknown_option_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError) as err:
        create_policy(ServerConfig(policy="openvla-rsd", policy_options={"rsd_mode": "exact"}))
    text = str(err.value)
    assert "unknown option(s) for openvla-rsd: rsd_mode" in text
    assert "known: libero_preprocess, replan_steps, calib_data, calib_n, calib_seed" in text
    assert "--list-policies" in text


def test_options_are_typed_dataclasses_with_shared_calibration_fields() -> None:
    assert issubclass(GR00TOptions, CalibrationOptions) and issubclass(OpenVLAOptions, CalibrationOptions)
    policy = create_policy(ServerConfig(policy="debug", policy_options={"horizon": "4", "delay_ms": "1.5"}))
    assert isinstance(policy, DebugPolicy) and (policy.horizon, policy.delay_ms) == (4, 1.5)
    with pytest.raises(ConfigError, match="gripper_convention"):
        GR00TOptions(gripper_convention="sideways")  # direct construction gets the same checks


def test_list_policies_prints_each_policys_options() -> None:
    text = describe_policies()
    for name in ("debug", "gr00t", "openvla", "openvla-rsd"):
        assert re.search(rf"^{re.escape(name)}\s", text, re.M), name
    assert re.search(r"--policy-option horizon=<int>\s+chunk length .*\(default 8\)", text)
    assert re.search(r"--policy-option gripper_convention=<str>.*one of libero, openvla", text)
    assert "calib_data=<str, optional>" in text and "calib_n=<int>" in text
    out = subprocess.run([PY, "-m", "server", "--list-policies"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and out.stdout == text
    helptext = subprocess.run([PY, "-m", "server", "--help"], cwd=REPO, capture_output=True, text=True,
                              timeout=60).stdout
    assert "rsd_mode=" not in helptext and "--list-policies" in helptext.split("--policy-option KEY=VALUE")[-1]


# ---------------------------------------------------------------------------------------------- build order
def test_factory_loads_then_quantises_then_wraps_with_the_report(
        temporary_policy: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from quant.testing import gr00t_like

    log: list[str] = []

    def load(ctx: PolicyContext) -> Any:
        log.append("load")
        return gr00t_like()

    temporary_policy(PolicySpec("test-order", "records the build order",
                                lambda ctx, model, q: RecordingPolicy(model, q, log),
                                CalibrationOptions, load=load))
    monkeypatch.setenv("GR00T_DUQUANT_WBITS_DEFAULT", "4")
    policy = create_policy(ServerConfig(policy="test-order", model_path=str(tmp_path)))
    assert log == ["load", "wrap"]
    assert isinstance(policy, RecordingPolicy) and policy.quantization["enabled"]
    assert policy.layers_at_construction == policy.quantization["layers"] > 0  # quantised before the wrap
    monkeypatch.delenv("GR00T_DUQUANT_WBITS_DEFAULT")
    assert create_policy(ServerConfig(policy="test-order", model_path=str(tmp_path))).quantization == {
        "enabled": False}


def test_model_backed_policy_needs_a_checkpoint(temporary_policy: Any) -> None:
    temporary_policy(PolicySpec("test-needs-path", "", lambda ctx, m, q: RecordingPolicy(m, q, []),
                                load=lambda ctx: None))
    with pytest.raises(ValueError, match="--policy test-needs-path needs --model-path"):
        create_policy(ServerConfig(policy="test-needs-path"))
    assert policy_spec("openvla-rsd").default_checkpoint() == models.shipped_checkpoint(models.EMBEDDED_OPENVLA_RSD)


# ---------------------------------------------------------------------------------------------- dry run
def test_dry_run_is_an_error_not_an_exit(temporary_policy: Any, monkeypatch: pytest.MonkeyPatch,
                                         tmp_path: Path) -> None:
    def load(ctx: PolicyContext) -> Any:
        raise AssertionError("the dry run must not load weights")

    temporary_policy(PolicySpec("test-dry", "", lambda ctx, m, q: RecordingPolicy(m, q, []), load=load))
    monkeypatch.setenv("GR00T_DUQUANT_DRYRUN", "1")
    try:
        create_policy(ServerConfig(policy="test-dry", model_path=str(tmp_path)))
    except SystemExit:  # pragma: no cover - the regression this test guards against
        pytest.fail("building a policy with GR00T_DUQUANT_DRYRUN=1 ended the process")
    except DryRunRequested as exc:
        assert isinstance(exc, ValueError) and "python -m quant.scan" in str(exc)
        assert exc.scan_argv == ["--policy", "test-dry", "--model-path", str(tmp_path)]
    else:  # pragma: no cover
        pytest.fail("no DryRunRequested")


def test_dryrun_script_without_arguments_scans_the_shipped_gr00t() -> None:
    shipped = models.shipped_checkpoint(models.EMBEDDED_GR00T)
    assert (shipped / "config.json").is_file(), "the shipped GR00T checkpoint is missing"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GR00T_DUQUANT_")}
    env["PYTHON"] = PY
    res = subprocess.run([str(REPO / "test_duquant_dryrun.sh")], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines and all(DRY.match(line) for line in lines[:-1]), lines[:3]
    assert TOTAL.match(lines[-1]) and int(TOTAL.match(lines[-1]).group(1)) == len(lines) - 1
    names = [DRY.match(line).group(1) for line in lines[:-1]]
    assert any(".language_model." in n for n in names) and any(n.startswith("action_head.") for n in names)


def test_scan_of_openvla_without_a_checkpoint_fails_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    from quant import scan

    assert scan.main(["--policy", "openvla"]) == 2
    assert "--policy openvla needs --model-path" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- interface
def test_checkpoint_error_is_caught_by_type(temporary_policy: Any, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    class ShardMissing(models.CheckpointError):  # another class name: caught because it *is* a CheckpointError
        pass

    def load(ctx: PolicyContext) -> Any:
        raise ShardMissing(f"{ctx.model_path}/model-00001-of-00002.safetensors: truncated header")

    temporary_policy(PolicySpec("test-bad-ckpt", "", lambda ctx, m, q: RecordingPolicy(m, q, []), load=load))
    assert server_main(["--policy", "test-bad-ckpt", "--model-path", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--model-path:" in err and "model-00001-of-00002.safetensors" in err and "Traceback" not in err


def test_live_metadata_is_part_of_the_interface() -> None:
    assert DebugPolicy().live_metadata() == {}
    assert "live_metadata" in Policy.__dict__

    class Counting(RecordingPolicy):
        def live_metadata(self) -> dict[str, Any]:
            return {"served": 3}

    plain = PolicyServer(ServerConfig(policy="debug"), RecordingPolicy(None, {"enabled": False}, []))
    live = PolicyServer(ServerConfig(policy="debug"), Counting(None, {"enabled": False}, []))
    assert "served" not in plain.metadata() and live.metadata()["served"] == 3


# ---------------------------------------------------------------------------------------------- client hints
def test_each_policy_kind_advertises_the_libero_image_path_of_its_released_checkpoints() -> None:
    """metadata["preprocess"] is what ``run_libero_eval.sh`` follows by default (``--preprocess auto``)."""
    kinds = {name: policy_spec(name).preprocess for name in ("debug", "openvla", "openvla-oft", "gr00t", "openvla-rsd")}
    assert kinds == {"debug": "none", "openvla": "openvla", "openvla-oft": "openvla", "gr00t": "gr00t",
                     "openvla-rsd": "none"}
    policy = create_policy(ServerConfig(policy="debug"))
    assert policy.served_metadata()["preprocess"] == "none"
    assert PolicyServer(ServerConfig(policy="debug"), policy).metadata()["preprocess"] == "none"
    own = create_policy(ServerConfig(policy="debug", policy_options={"libero_preprocess": "openvla"}))
    assert PolicyServer(ServerConfig(policy="debug"), own).metadata()["preprocess"] == "openvla"
    with pytest.raises(ConfigError, match=re.escape("--policy-option libero_preprocess='jpeg': must be one of")):
        create_policy(ServerConfig(policy="debug", policy_options={"libero_preprocess": "jpeg"}))


def test_replan_steps_is_advertised_and_bounded_by_the_chunk() -> None:
    """metadata["replan_steps"] is the client's ``--replan`` default (the tiny GR00T executes 8 of its 16)."""
    from client.libero.config import config_from_args
    from client.libero.evaluate import ServerContract

    plain = PolicyServer(ServerConfig(policy="debug"), create_policy(ServerConfig(policy="debug"))).metadata()
    assert "replan_steps" not in plain  # the whole chunk
    opts = {"horizon": "16", "replan_steps": "8"}
    meta = PolicyServer(ServerConfig(policy="debug"),
                        create_policy(ServerConfig(policy="debug", policy_options=opts))).metadata()
    assert (meta["action_horizon"], meta["replan_steps"]) == (16, 8)
    assert ServerContract(meta, config_from_args(["libero_spatial", "--headless"])).replan == 8
    assert ServerContract(meta, config_from_args(["libero_spatial", "--headless", "--replan", "2"])).replan == 2
    with pytest.raises(ValueError, match=r"replan_steps=9 is more than the 8 actions of a debug chunk"):
        create_policy(ServerConfig(policy="debug", policy_options={"replan_steps": "9"}))
    with pytest.raises(ConfigError, match=re.escape("--policy-option replan_steps='-1': must be >= 0")):
        create_policy(ServerConfig(policy="debug", policy_options={"replan_steps": "-1"}))


def test_gr00t_instruction_text_option_reaches_the_prompt_and_metadata() -> None:
    tiny = str(models.shipped_checkpoint(models.EMBEDDED_GR00T))
    default = create_policy(ServerConfig(policy="gr00t", model_path=tiny))
    plain = create_policy(ServerConfig(policy="gr00t", model_path=tiny,
                                       policy_options={"instruction_text": "plain", "libero_preprocess": "none"}))
    assert default.served_metadata()["instruction_text"] == "list_repr"
    assert default.served_metadata()["preprocess"] == "gr00t"
    assert (plain.served_metadata()["instruction_text"], plain.served_metadata()["preprocess"]) == ("plain", "none")
    ids_list, _ = default.model.build_input_ids(["put the bowl on the plate"], 2)
    ids_plain, _ = plain.model.build_input_ids(["put the bowl on the plate"], 2)
    text = default.model.tokenizer.decode(ids_list[0].tolist(), skip_special_tokens=False)
    assert "['put the bowl on the plate']<|im_end|>" in text
    assert ids_plain.shape[1] < ids_list.shape[1]  # the same prompt without the repr's brackets and quotes
    with pytest.raises(ConfigError, match="instruction_text"):
        create_policy(ServerConfig(policy="gr00t", model_path=tiny, policy_options={"instruction_text": "upper"}))
