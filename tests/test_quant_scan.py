"""Dry-run listing format, REPLACED log lines, the scan CLI and test_duquant_dryrun.sh."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from quant import DuQuantConfig, quantized_layers, replace_linear_layers, scan_model
from quant import scan as scan_cli
from quant.testing import gr00t_like

ROOT = Path(__file__).resolve().parents[1]
DRY = re.compile(r"^\[GR00T-DUQUANT\]\[DRYRUN\] (\S+): Linear\((\d+)->(\d+)\) W(\d+) A(\d+|off) .*$")


def test_scan_format_on_meta_device() -> None:
    with torch.device("meta"):
        model = gr00t_like(llm_layers=3, dit_layers=4)
    lines = scan_model(model, DuQuantConfig())  # scanning does not need `enabled`, nor weights
    body, total = lines[:-1], lines[-1]
    assert total == f"[GR00T-DUQUANT] Dry-run total layers listed: {len(body)}"
    assert len(body) == 3 * 7 + 4 * 2 + 2
    for line in body:
        m = DRY.match(line)
        assert m, line
        mod = model.get_submodule(m.group(1))
        assert (int(m.group(2)), int(m.group(3))) == (mod.in_features, mod.out_features)
        assert m.group(4) == "4" and m.group(5) == "8"
    assert "A" + "off" in scan_model(model, DuQuantConfig(abits=0))[0]


def test_dryrun_replaces_nothing_and_real_run_logs(caplog: pytest.LogCaptureFixture) -> None:
    model = gr00t_like()
    with caplog.at_level(logging.INFO, logger="quant"):
        assert replace_linear_layers(model, DuQuantConfig(enabled=True, dryrun=True)) == []
    assert not quantized_layers(model)
    assert "Dry-run total layers listed: 20" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="quant"):
        report = replace_linear_layers(model, DuQuantConfig(enabled=True))
    assert len(report) == 20 and len(quantized_layers(model)) == 20
    name, d_in, d_out, wb, ab = report[0]
    assert (wb, ab) == (4, 8)
    assert f"[GR00T-DUQUANT][REPLACED] {name}: Linear({d_in}->{d_out}) -> DuQuantLinear W4 A8" in caplog.text
    assert "[GR00T-DUQUANT] Total layers replaced: 20" in caplog.text
    # replacing again finds no fresh Linear to wrap
    assert replace_linear_layers(model, DuQuantConfig(enabled=True)) == []


def test_disabled_config_leaves_model_alone(caplog: pytest.LogCaptureFixture) -> None:
    model = gr00t_like()
    with caplog.at_level(logging.INFO, logger="quant"):
        assert replace_linear_layers(model, DuQuantConfig.from_env({})) == []
    assert "DuQuant not enabled" in caplog.text and not quantized_layers(model)


def test_cli_without_models_builder_fails_clearly(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "models", types.ModuleType("models"))
    with pytest.raises(SystemExit, match="build_for_scan is not available"):
        scan_cli.main(["--policy", "gr00t", "--model-path", "/nonexistent"])


def test_cli_demo_tree(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    for k in [k for k in os.environ if k.startswith("GR00T_DUQUANT_")]:
        monkeypatch.delenv(k)
    assert scan_cli.main(["--policy", "demo-openvla"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1] == "[GR00T-DUQUANT] Dry-run total layers listed: 14"
    monkeypatch.setenv("GR00T_DUQUANT_ROW_ROT", "sideways")
    assert scan_cli.main(["--policy", "demo-gr00t"]) == 2
    assert "GR00T_DUQUANT_ROW_ROT" in capsys.readouterr().err


def test_dryrun_shell_script() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GR00T_DUQUANT_")}
    env["PYTHON"] = sys.executable
    env["GR00T_DUQUANT_SCOPE"] = "action_head"
    res = subprocess.run([str(ROOT / "test_duquant_dryrun.sh"), "--policy", "demo-gr00t"], env=env,
                         capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == "[GR00T-DUQUANT] Dry-run total layers listed: 6"
    assert all(DRY.match(x) for x in lines[:-1])
