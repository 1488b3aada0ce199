"""benchmarks/compare_libero.py: pairing LIBERO runs recorded at different times on their shared episodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.compare_libero import main, paired
from client.libero.results import mcnemar_exact_p


def _results(path: Path, outcomes: dict[tuple[int, int], bool], server: dict | None = None) -> Path:
    eps = [{"task_id": t, "trial": k, "success": s, "errored": False, "steps": 100, "wall_time_s": 1.0}
           for (t, k), s in outcomes.items()]
    path.write_text(json.dumps({"suite": "libero_spatial", "config": {"server": server or {}}, "episodes": eps}))
    return path


def test_pairs_runs_on_their_shared_episodes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    keys = [(t, k) for t in range(2) for k in range(10)]
    ref = {key: i % 2 == 0 for i, key in enumerate(keys)}  # 10 of 20
    new = {key: i % 2 == 0 or i < 8 for i, key in enumerate(keys)}  # those + 4 more
    new[(1, 8)] = False  # one the reference solved
    new[(5, 0)] = True  # not in the reference: never paired
    a, b = _results(tmp_path / "a.json", ref), _results(tmp_path / "b.json", new)
    out, png = tmp_path / "cmp.json", tmp_path / "cmp.png"
    assert main([f"old={a}", f"new={b}", "--out", str(out), "--plot", str(png), "--note", "x"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["new_vs_old_only_new"] == 4 and figures["new_vs_old_only_old"] == 1
    assert figures["new_vs_old_mcnemar_p"] == round(mcnemar_exact_p(4, 1), 4)
    assert figures["new_ratio_vs_old"] == 1.3  # 13 / 10 solved
    lo, hi = figures["new_ratio_vs_old_ci95"]
    assert lo <= 1.3 <= hi and lo > 0.9
    doc = json.loads(out.read_text())
    assert doc["reference"] == "old" and doc["paired"]["new vs old"]["episodes"] == 20 and doc["note"] == "x"
    assert png.stat().st_size > 1000
    # a kept summary's variant pairs the same way
    assert main([f"old={out}#old", f"new={out}#new"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["new_vs_old_only_new"] == 4


def test_a_run_joined_from_disjoint_sources(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``LABEL=A+B``: init states 0-1 of one run and 2-3 of a later one are one run of 4 per task."""
    first = _results(tmp_path / "first.json", {(0, 0): True, (0, 1): False, (1, 0): True, (1, 1): True})
    later = _results(tmp_path / "later.json", {(0, 2): True, (0, 3): True, (1, 2): False, (1, 3): False})
    new = _results(tmp_path / "new.json", {(t, k): True for t in range(2) for k in range(4)})
    assert main([f"ref={first}+{later}", f"new={new}"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    figures = json.loads(lines[-1])
    assert figures["ref_success_rate"] == 0.625 and figures["new_vs_ref_only_new"] == 3
    assert figures["new_vs_ref_only_ref"] == 0 and "8 paired episodes" in "\n".join(lines)
    assert main([f"ref={first}+{first}", f"new={new}"]) == 2  # the same episode twice
    assert "in two of its sources" in capsys.readouterr().err


def test_sources_of_different_checkpoints_are_not_joined(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Results files record the served model (config ``server``); a checkpoint retrained in place keeps its path
    but not its digest, and two runs of different weights are not one run."""
    ident = {"policy": "gr00t", "model_id": "models/checkpoints/g", "checkpoint_digest": "aaaa",
             "quantization": {"enabled": False}}
    first = _results(tmp_path / "first.json", {(0, 0): True, (0, 1): False}, ident)
    moved = _results(tmp_path / "moved.json", {(0, 2): True}, {**ident, "model_id": "/elsewhere/g"})
    retrained = _results(tmp_path / "retrained.json", {(0, 2): True}, {**ident, "checkpoint_digest": "bbbb"})
    quantised = _results(tmp_path / "w4a8.json", {(0, 2): True}, {**ident, "quantization": {"enabled": True}})
    new = _results(tmp_path / "new.json", {(0, k): True for k in range(3)})
    assert main([f"ref={first}+{moved}", f"new={new}"]) == 0  # the same weights served from another path
    capsys.readouterr()
    for other, what in ((retrained, "checkpoint_digest"), (quantised, "quantization")):
        assert main([f"ref={first}+{other}", f"new={new}"]) == 2
        err = capsys.readouterr().err
        assert "were run against different models" in err and what in err


def test_refuses_what_it_cannot_pair(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = _results(tmp_path / "a.json", {(0, 0): True})
    b = _results(tmp_path / "b.json", {(0, 1): True})
    assert main([f"a={a}", f"b={b}"]) == 2 and "share no" in capsys.readouterr().err
    assert main([f"a={a}", "b"]) == 2 and "LABEL=PATH" in capsys.readouterr().err
    assert main([f"a={a}", f"b={a}#nope"]) == 2 and "no variant" in capsys.readouterr().err
    with pytest.raises(ValueError, match="share no"):
        paired({"0:0": True}, {"0:1": True})


def test_quick_pairs_the_kept_runs(capsys: pytest.CaptureFixture[str]) -> None:
    """--quick (CI size) pairs two runs kept in docs/results: 10k expected vs 5k greedy on the same 100 episodes."""
    import os

    from client.testing import REPO

    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        assert main(["--quick"]) == 0
    finally:
        os.chdir(cwd)
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["5k_greedy_success_rate"] == 0.49 and figures["shipped_success_rate"] == 0.61
    assert figures["shipped_vs_5k_greedy_only_shipped"] == 21 and figures["shipped_vs_5k_greedy_only_5k_greedy"] == 9
    assert main([]) == 2 and "--quick" in capsys.readouterr().err
