"""OpenVLA-OFT end to end: a tiny checkpoint in the released layout, the real server, the real LIBERO client.

The client is left at ``--preprocess auto``: the ``openvla-oft`` policy advertises upstream OpenVLA's LIBERO image
path, so the episode must run with it (JPEG round trip, lanczos to 224) and the results file must say so; the
8-step chunks, wrist image and 8-D state reach the model as its released harness sends them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("libero.libero", reason="needs the LIBERO simulator (.venv-libero: scripts/setup.sh libero)")

from client.libero.protocol import PREPROCESS_DESCRIPTIONS  # noqa: E402
from client.testing import REPO, SERVER_PYTHON, ServerProcess  # noqa: E402

pytestmark = pytest.mark.libero


@pytest.fixture(scope="module")
def oft_dir(tmp_path_factory) -> Path:  # noqa: ANN001
    out = tmp_path_factory.mktemp("oft") / "openvla-7b-oft-finetuned-libero-spatial-tiny"
    code = "import sys, torch; torch.set_num_threads(1); from models.openvla import oft; oft.build_tiny_dir(sys.argv[1])"
    r = subprocess.run([SERVER_PYTHON, "-c", code, str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in out.glob("*--*_checkpoint.*"))  # the separate released head files
    return out


def test_oft_checkpoint_runs_a_libero_episode_with_its_harness_preprocessing(oft_dir: Path, tmp_path: Path) -> None:
    results = tmp_path / "results.json"
    with ServerProcess(["--policy", "openvla-oft", "--model-path", str(oft_dir)], ready_timeout_s=300) as server:
        r = subprocess.run([sys.executable, "-m", "client.libero.evaluate", "libero_spatial", "--headless",
                            "--port", str(server.port), "--tasks", "0", "--trials", "1", "--max-steps", "20",
                            "--results", str(results), "--no-video", "--no-progress", "--timeout", "120"],
                           cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(results.read_text())
    config = doc["config"]
    assert config["preprocess"] == "openvla" and config["extra"]["preprocess_from"] == "server metadata"
    assert config["preprocessing"] == PREPROCESS_DESCRIPTIONS["openvla"]
    (ep,) = doc["episodes"]
    assert not ep["errored"] and ep["error"] is None, ep
    assert ep["steps"] == 20 and ep["num_queries"] == 3  # 8-step chunks executed whole: queries at 0, 8, 16
    assert "horizon 8" in r.stderr and "preprocess openvla" in r.stderr
