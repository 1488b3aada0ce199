"""The success-rate matrix runner (benchmarks/support/libero_matrix.py) without the simulator.

The scheduler's parts that decide what a table says: results merging, Wilson intervals, the same-episodes
comparison figures, variant construction and job command lines. The real servers + simulator path runs in CI
through ``benchmarks/bench_libero_success.py --quick``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import benchmarks.support.libero_matrix as lm
from benchmarks.bench_libero_success import derived_figures


def _write_results(path: Path, episodes: list[tuple[int, int, bool, bool]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    eps = [{"task_id": t, "trial": k, "success": s, "errored": e, "steps": 100 if s else 220, "wall_time_s": 10.0}
           for t, k, s, e in episodes]
    path.write_text(json.dumps({"episodes": eps}))


def test_summary_merges_jobs_and_excludes_errored_episodes(tmp_path) -> None:
    _write_results(tmp_path / "task_00.json", [(0, 0, True, False), (0, 1, False, False), (0, 2, False, True)])
    _write_results(tmp_path / "task_01.json", [(1, 0, True, False), (1, 1, True, False)])
    s = lm._summarise([tmp_path / "task_00.json", tmp_path / "task_01.json", tmp_path / "missing.json"])
    assert (s["successes"], s["valid_episodes"], s["errored"]) == (3, 4, 1)
    assert s["success_rate"] == pytest.approx(0.75)
    assert s["per_task"] == {"0": "1/2", "1": "2/2"}
    lo, hi = s["ci95"]
    assert 0.0 < lo < 0.75 < hi <= 1.0
    assert s["mean_steps"] == pytest.approx((100 + 220 + 100 + 100) / 4)


def test_empty_summary_has_no_rate(tmp_path) -> None:
    s = lm._summarise([tmp_path / "nothing.json"])
    assert s["success_rate"] is None and s["valid_episodes"] == 0 and s["ci95"] == [0.0, 1.0]


def test_derived_figures_compare_each_variant_with_its_reference() -> None:
    variants = {
        "main_only": {"success_rate": 0.5}, "exact": {"success_rate": 0.5}, "relaxed": {"success_rate": 0.4},
        "gr00t_fp": {"success_rate": 0.25}, "gr00t_rtn": {"success_rate": 0.2}, "gr00t_duquant": {"success_rate": 0.25},
        "broken": {"success_rate": None},
    }
    f = derived_figures(variants)
    assert f["exact_minus_main_only_pts"] == 0.0 and f["relaxed_minus_main_only_pts"] == pytest.approx(-10.0)
    assert f["gr00t_duquant_retention_vs_gr00t_fp_pct"] == 100.0
    assert f["gr00t_rtn_retention_vs_gr00t_fp_pct"] == 80.0
    assert "broken_success_rate" not in f and "main_only_minus_main_only_pts" not in f


def test_quant_variants_share_flags_and_differ_only_in_quantisation(tmp_path) -> None:
    vs = lm.quant_variants("gr00t", "/ckpt/gr00t", tmp_path, "demos/*.hdf5", 16, 4)
    assert [v.label for v in vs] == ["gr00t_fp", "gr00t_rtn", "gr00t_duquant"]
    fp, rtn, dq = vs
    assert fp.env == {} and "--policy-option" not in fp.server_args
    for v in (rtn, dq):
        assert v.server_args[: len(fp.server_args)] == fp.server_args
        assert "calib_data=demos/*.hdf5" in v.server_args and v.env["GR00T_DUQUANT_CALIB_STEPS"] == "16"
        assert v.env["GR00T_DUQUANT_WBITS_DEFAULT"] == "4" and v.env["GR00T_DUQUANT_ABITS"] == "8"
    assert rtn.env["GR00T_DUQUANT_PERMUTE"] == "0" and dq.env["GR00T_DUQUANT_PERMUTE"] == "1"
    assert rtn.env["GR00T_DUQUANT_PACKDIR"] != dq.env["GR00T_DUQUANT_PACKDIR"]
    assert fp.server_args[fp.server_args.index("--denoising-steps") + 1] == "4"


def test_job_command_targets_one_task_and_resumes(tmp_path) -> None:
    cfg = lm.MatrixConfig(suite="libero_spatial", tasks=[3], trials=7, workers=1, out_dir=tmp_path, seed=11,
                          max_steps=20, resolution=128, client_python="py")
    v = lm.Variant("relaxed", ["--policy", "openvla-rsd"], client_args=["--replan", "4"])
    cmd = lm._job_cmd(cfg, v, 5601, 3, tmp_path / "r.json")
    assert cmd[:3] == ["py", "-m", "client.libero.evaluate"]
    for flag, value in (("--port", "5601"), ("--tasks", "3"), ("--trials", "7"), ("--seed", "11"),
                        ("--max-steps", "20"), ("--resolution", "128"), ("--replan", "4")):
        assert cmd[cmd.index(flag) + 1] == value
    assert "--resume" in cmd and "--no-video" in cmd


def test_duplicate_labels_are_refused(tmp_path) -> None:
    cfg = lm.MatrixConfig(suite="libero_spatial", tasks=[0], trials=1, workers=1, out_dir=tmp_path)
    with pytest.raises(ValueError, match="unique"):
        lm.run_matrix([lm.Variant("a", []), lm.Variant("a", [])], cfg)


def test_paired_comparison_counts_discordant_episodes_and_tests_them() -> None:
    from client.libero.results import mcnemar_exact_p

    fp = {f"0:{k}": k < 6 for k in range(10)}        # solves trials 0-5
    rtn = {f"0:{k}": k in (0, 7) for k in range(10)}  # solves 0 and 7
    dq = {f"0:{k}": k < 5 for k in range(10)}        # solves 0-4
    variants = {
        "gr00t_fp": {"success_rate": 0.6, "outcomes": fp},
        "gr00t_rtn": {"success_rate": 0.2, "outcomes": rtn},
        "gr00t_duquant": {"success_rate": 0.5, "outcomes": dq},
    }
    f = derived_figures(variants)
    assert f["gr00t_duquant_vs_gr00t_rtn_only_gr00t_duquant"] == 4  # trials 1-4
    assert f["gr00t_duquant_vs_gr00t_rtn_only_gr00t_rtn"] == 1      # trial 7
    assert f["gr00t_duquant_vs_gr00t_fp_only_gr00t_fp"] == 1 and f["gr00t_duquant_vs_gr00t_fp_only_gr00t_duquant"] == 0
    assert f["gr00t_rtn_vs_gr00t_fp_paired_episodes"] == 10
    assert f["gr00t_duquant_vs_gr00t_rtn_mcnemar_p"] == pytest.approx(mcnemar_exact_p(4, 1), abs=1e-4)


def test_mcnemar_exact_matches_the_binomial_tail() -> None:
    from client.libero.results import mcnemar_exact_p

    assert mcnemar_exact_p(0, 0) == 1.0
    assert mcnemar_exact_p(3, 3) == 1.0
    # n = 17, min 5: 2 * sum_{i<=5} C(17, i) / 2^17 = 2 * 9402 / 131072
    assert mcnemar_exact_p(12, 5) == pytest.approx(2 * 9402 / 131072)
    assert mcnemar_exact_p(5, 12) == mcnemar_exact_p(12, 5)
    assert mcnemar_exact_p(10, 0) == pytest.approx(2 / 1024)
    with pytest.raises(ValueError):
        mcnemar_exact_p(-1, 2)
