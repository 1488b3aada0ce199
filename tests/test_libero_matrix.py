"""The success-rate matrix runner (benchmarks/support/libero_matrix.py) without the simulator.

The parts that decide what a table says: results merging, Wilson intervals, the same-episodes comparison
figures, variant construction, each variant's client config, the episode jobs handed to the pool and what a
re-run resumes. The real servers + simulator path runs in CI through ``benchmarks/bench_libero_success.py --quick``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

import benchmarks.support.libero_matrix as lm
from benchmarks.bench_libero_success import build_variants, derived_figures
from client.libero.results import EpisodeResult


def _write_results(path: Path, episodes: list[tuple[int, int, bool, bool]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    eps = [{"task_id": t, "trial": k, "success": s, "errored": e, "steps": 100 if s else 220, "wall_time_s": 10.0}
           for t, k, s, e in episodes]
    path.write_text(json.dumps({"episodes": eps}))


def test_summary_merges_jobs_and_excludes_errored_episodes(tmp_path) -> None:
    _write_results(tmp_path / "task_00.json", [(0, 0, True, False), (0, 1, False, False), (0, 2, False, True)])
    _write_results(tmp_path / "task_01.json", [(1, 0, True, False), (1, 1, True, False)])
    s = lm.summarise([tmp_path / "task_00.json", tmp_path / "task_01.json", tmp_path / "missing.json"])
    assert (s["successes"], s["valid_episodes"], s["errored"]) == (3, 4, 1)
    assert s["success_rate"] == pytest.approx(0.75)
    assert s["per_task"] == {"0": "1/2", "1": "2/2"}
    lo, hi = s["ci95"]
    assert 0.0 < lo < 0.75 < hi <= 1.0
    assert s["mean_steps"] == pytest.approx((100 + 220 + 100 + 100) / 4)


def test_empty_summary_has_no_rate(tmp_path) -> None:
    s = lm.summarise([tmp_path / "nothing.json"])
    assert s["success_rate"] is None and s["valid_episodes"] == 0 and s["ci95"] == [0.0, 1.0]


def test_derived_figures_compare_each_variant_with_its_reference() -> None:
    variants = {
        "main_only": {"success_rate": 0.5}, "exact": {"success_rate": 0.5}, "relaxed": {"success_rate": 0.4},
        "gr00t_fp": {"success_rate": 0.25}, "gr00t_rtn": {"success_rate": 0.2}, "gr00t_duquant": {"success_rate": 0.25},
        "gr00t_duquant_w4a4": {"success_rate": 0.125}, "gr00t_duquant_w4a4_token": {"success_rate": 0.25},
        "broken": {"success_rate": None},
    }
    f = derived_figures(variants)
    assert f["exact_minus_main_only_pts"] == 0.0 and f["relaxed_minus_main_only_pts"] == pytest.approx(-10.0)
    assert f["gr00t_duquant_retention_vs_gr00t_fp_pct"] == 100.0
    assert f["gr00t_rtn_retention_vs_gr00t_fp_pct"] == 80.0
    assert f["gr00t_duquant_w4a4_retention_vs_gr00t_fp_pct"] == 50.0  # against full precision, not W4A8
    assert f["gr00t_duquant_w4a4_token_retention_vs_gr00t_fp_pct"] == 100.0
    assert "broken_success_rate" not in f and "main_only_minus_main_only_pts" not in f


def test_quant_variants_share_flags_and_differ_only_in_quantisation(tmp_path) -> None:
    vs = lm.quant_variants("gr00t", "/ckpt/gr00t", tmp_path, "demos/*.hdf5", 16, 4)
    assert [v.label for v in vs] == ["gr00t_fp", "gr00t_rtn", "gr00t_duquant", "gr00t_duquant_w4a4",
                                     "gr00t_duquant_w4a4_token"]
    fp, rtn, dq, a4, a4t = vs
    assert a4t.env["GR00T_DUQUANT_ACT_GRAN"] == "token" and a4t.env["GR00T_DUQUANT_ABITS"] == "4"
    assert a4.env["GR00T_DUQUANT_ACT_GRAN"] == "tensor" and a4.env["GR00T_DUQUANT_ABITS"] == "4"  # static A4
    assert fp.env == {} and not any(a.startswith("calib_") for a in fp.server_args)
    for v in (rtn, dq, a4, a4t):
        assert v.server_args[: len(fp.server_args)] == fp.server_args
        assert "calib_data=demos/*.hdf5" in v.server_args and v.env["GR00T_DUQUANT_CALIB_STEPS"] == "16"
        assert v.env["GR00T_DUQUANT_WBITS_DEFAULT"] == "4"
    assert rtn.env["GR00T_DUQUANT_ABITS"] == dq.env["GR00T_DUQUANT_ABITS"] == "8" and a4.env["GR00T_DUQUANT_ABITS"] == "4"
    a4_only = ("GR00T_DUQUANT_ABITS", "GR00T_DUQUANT_ACT_GRAN", "GR00T_DUQUANT_PACKDIR")
    assert {k: v for k, v in a4.env.items() if k not in a4_only} == {k: v for k, v in dq.env.items() if k not in a4_only}
    assert rtn.env["GR00T_DUQUANT_PERMUTE"] == "0" and dq.env["GR00T_DUQUANT_PERMUTE"] == "1"
    assert len({v.env["GR00T_DUQUANT_PACKDIR"] for v in (rtn, dq, a4)}) == 3
    assert fp.server_args[fp.server_args.index("--denoising-steps") + 1] == "4"
    # otherwise GR00T is served as its checkpoint's serving.json says: no sampler or replan flag of the matrix's own
    shipped = lm.quant_variants("gr00t", "/ckpt/gr00t", tmp_path, None, 16)[0].server_args
    assert shipped == ["--policy", "gr00t", "--model-path", "/ckpt/gr00t"]
    gaussian = lm.quant_variants("gr00t", "/ckpt/gr00t", tmp_path, None, 16, 4, initial_noise="gaussian")
    assert all("initial_noise=gaussian" in v.server_args for v in gaussian)
    whole = lm.quant_variants("gr00t", "/ckpt/gr00t", tmp_path, None, 16, 4, gr00t_replan_steps=0)
    assert all("replan_steps=0" in v.server_args for v in whole)
    assert not any("replan_steps" in a or "initial_noise" in a
                   for a in lm.quant_variants("openvla-rsd", None, tmp_path, None, 16, 8, "zero", 8)[0].server_args)


def _matrix(tmp_path: Path, **kw) -> lm.MatrixConfig:
    base = dict(suite="libero_spatial", tasks=[3, 5], trials=2, workers=2, out_dir=tmp_path, seed=11, max_steps=20,
                resolution=128, client_python="py")
    return lm.MatrixConfig(**{**base, **kw})


def _episode(task: int, trial: int, success: bool = True, errored: bool = False) -> EpisodeResult:
    return EpisodeResult(task_id=task, task_name=f"t{task}", instruction="do it", trial=trial,
                         init_state_index=trial, success=success, errored=errored, steps=50 if success else 20,
                         wall_time_s=1.5, error="PolicyClientError: down" if errored else None)


def test_eval_config_has_the_matrix_settings_and_the_variants_client_flags(tmp_path) -> None:
    cfg = _matrix(tmp_path, trials=7, replan=2, ensemble=0.0)
    v = lm.Variant("relaxed", ["--policy", "openvla-rsd"], client_args=["--replan", "4", "--timeout", "90"])
    e = lm.eval_config(cfg, v, 5601)
    assert (e.suite, e.port, e.tasks, e.trials, e.seed) == ("libero_spatial", 5601, [3, 5], 7, 11)
    assert (e.max_steps, e.resolution, e.workers) == (20, 128, 2)
    assert e.replan == 4 and e.timeout_s == 90.0  # a variant's own client flags override the matrix's
    assert e.ensemble == 0.0  # the matrix's --ensemble reaches every variant's client
    assert e.resume and e.headless and not e.save_video and not e.progress
    assert e.results_path == tmp_path / "relaxed" / "results.json" == lm.results_path(cfg, "relaxed")
    plain = lm.eval_config(_matrix(tmp_path, max_steps=None, resolution=None), lm.Variant("a", []), 5602)
    assert plain.ensemble is None and plain.replan is None and plain.resolution == 256 and plain.max_steps is None  # the client's defaults
    with pytest.raises(ValueError, match="--replan"):
        lm.eval_config(cfg, lm.Variant("bad", [], client_args=["--replan", "0"]), 5603)
    assert not plain.gripper_confirm and plain.trajectory_dir is None
    probe = lm.eval_config(_matrix(tmp_path, gripper_confirm=True, trajectories=True), lm.Variant("b", []), 5604)
    assert probe.gripper_confirm and probe.trajectory_dir == str(tmp_path / "b" / "trajectories")


def test_jobs_are_task_major_interleave_the_variants_and_skip_recorded_episodes(tmp_path) -> None:
    cfg = _matrix(tmp_path)
    configs = {label: lm.eval_config(cfg, lm.Variant(label, []), port) for label, port in (("a", 6001), ("b", 6002))}
    jobs = lm.build_jobs(configs, {"b": {(3, 1)}}, cfg.tasks, cfg.trials)
    assert [(j.task_id, j.trial, j.tag) for j in jobs] == [
        (3, 0, "a"), (3, 0, "b"), (3, 1, "a"), (5, 0, "a"), (5, 0, "b"), (5, 1, "a"), (5, 1, "b")]
    assert all(j.cfg is configs[j.tag] for j in jobs)  # each episode goes to its own variant's server
    assert {j.cfg.port for j in jobs if j.tag == "b"} == {6002}


def test_first_trial_moves_the_window_of_init_states(tmp_path) -> None:
    """``--first-trial 10 --trials 2`` runs init states 10 and 11 (more paired episodes for a run that has 0-9)."""
    cfg = _matrix(tmp_path, tasks=[4], trials=2, first_trial=10)
    e = lm.eval_config(cfg, lm.Variant("a", []), 6001)
    assert (e.first_trial, e.trials) == (10, 2)
    jobs = lm.build_jobs({"a": e}, {"a": {(4, 10)}}, cfg.tasks, cfg.trials, cfg.first_trial)
    assert [(j.task_id, j.trial) for j in jobs] == [(4, 11)]


def test_rerun_resumes_each_variant_from_its_results_file(tmp_path) -> None:
    cfg = _matrix(tmp_path, tasks=[0], trials=3)
    configs = {label: lm.eval_config(cfg, lm.Variant(label, []), 6000) for label in ("a", "b")}
    versions = {"mujoco": "x", "gl_backend": "egl"}
    first = {label: lm.open_results(e, versions) for label, e in configs.items()}
    rec = lm._Recorder(first)
    jobs = lm.build_jobs(configs, {}, cfg.tasks, cfg.trials)
    assert len(jobs) == 6
    for job in jobs[:4]:  # stopped after (0, 0) and (0, 1) of both variants; b's (0, 1) errored
        rec.on_result(job, _episode(job.task_id, job.trial, errored=(job.tag, job.trial) == ("b", 1)))
    again = {label: lm.open_results(e, versions) for label, e in configs.items()}  # the same command again
    todo = lm.build_jobs(configs, {label: r.done_keys() for label, r in again.items()}, cfg.tasks, cfg.trials)
    assert [(j.tag, j.task_id, j.trial) for j in todo] == [("b", 0, 1), ("a", 0, 2), ("b", 0, 2)]
    doc = json.loads(lm.results_path(cfg, "a").read_text())
    assert doc["suite"] == "libero_spatial" and doc["config"]["port"] == 6000 and doc["versions"] == versions
    assert [(e["task_id"], e["trial"]) for e in doc["episodes"]] == [(0, 0), (0, 1)]


def test_recorder_writes_each_variant_and_reports_only_episodes_lost_by_workers(tmp_path) -> None:
    cfg = _matrix(tmp_path, tasks=[0, 1], trials=1)
    configs = {label: lm.eval_config(cfg, lm.Variant(label, []), 6000) for label in ("main_only", "exact")}
    rec = lm._Recorder({label: lm.open_results(e, {}) for label, e in configs.items()})
    a0, b0, a1, b1 = lm.build_jobs(configs, {}, cfg.tasks, cfg.trials)
    rec.on_retry(a0, "worker 0 (pid 1) exited with code 57", 2)  # lost once, then it ran
    rec.on_result(a0, _episode(0, 0, success=True))
    rec.on_result(b0, _episode(0, 0, success=False))
    rec.on_result(a1, _episode(1, 0, errored=True))  # the server failed it: errored, not a lost episode
    rec.on_retry(b1, "worker 1: RuntimeError: no env", 2)
    rec.on_result(b1, _episode(1, 0, errored=True))  # lost on both attempts
    assert len(rec.failures) == 1 and rec.failures[0].startswith("exact task 1 trial 0:")
    a = json.loads(lm.results_path(cfg, "main_only").read_text())
    assert [(r["task_id"], r["trial"], r["attempt"]) for r in a["retries"]] == [(0, 0, 2)]
    sa, sb = (lm.summarise([lm.results_path(cfg, label)]) for label in ("main_only", "exact"))
    assert (sa["successes"], sa["valid_episodes"], sa["errored"], sa["per_task"]) == (1, 1, 1, {"0": "1/1"})
    assert (sb["successes"], sb["valid_episodes"], sb["errored"], sb["outcomes"]) == (0, 1, 1, {"0:0": False})
    assert sa["mean_steps"] == 50 and sa["median_episode_wall_s"] == 1.5


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


def test_rsd_fixed_depth_turns_the_adaptive_planner_off_on_every_openvla_rsd_server(tmp_path) -> None:
    args = argparse.Namespace(matrix="all", quant_policy=["openvla-rsd", "gr00t"], openvla_rsd_path=None,
                              gr00t_path="/ckpt/gr00t", relaxed_r=1, relaxed_tau=0.9, action_eps=0.5, calib_data=None,
                              calib_n=16, denoising_steps=None, initial_noise=None, gr00t_replan_steps=None, only=None,
                              rsd_fixed_depth=False)
    adaptive = build_variants(args, tmp_path)
    fixed = build_variants(argparse.Namespace(**{**vars(args), "rsd_fixed_depth": True}), tmp_path)
    assert [v.label for v in adaptive] == [v.label for v in fixed]
    for a, f in zip(adaptive, fixed, strict=True):
        if "openvla-rsd" in a.server_args:
            assert f.server_args == [*a.server_args, "--rsd-adaptive", "0"] and f.env == a.env
        else:
            assert f.server_args == a.server_args and "gr00t" in a.server_args
