"""The quality benchmark's bookkeeping: variant parsing, aggregation and the significance test."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import quality
from benchmarks.quality import SAME_BUDGET, against_full, committed_runs, parse_variant, significance, summarise
from rcekd import cli
from tests.benchmarks.fake_runs import quality_run as _run
from tests.rcekd.test_cli import train_args


def test_variants_parse_numbers_booleans_and_strings() -> None:
    assert parse_variant("rcekd") == ("rcekd", {})
    assert parse_variant("rcekd:ablation=wo_sep,beta=3,tau=0.5,icd=false") == (
        "rcekd",
        {"ablation": "wo_sep", "beta": 3, "tau": 0.5, "icd": False},
    )


def test_summary_means_and_paired_test_against_the_best_other_method() -> None:
    runs = [_run("none", s, 0.010 + 0.0001 * s) for s in range(5)]
    runs += [_run("rrd", s, 0.015 + 0.0001 * s) for s in range(5)]
    runs += [_run("rcekd", s, 0.019 + 0.0002 * s) for s in range(5)]
    runs += [_run("rcekd:ablation=wo_s", s, 0.03) for s in range(5)]  # ablations are not baselines
    table = summarise(runs, ["none", "rrd", "rcekd", "rcekd:ablation=wo_s"])
    assert table["rcekd"]["test/ndcg@20"]["mean"] == pytest.approx(0.0194)
    assert table["none"]["seeds"] == [0, 1, 2, 3, 4]
    result = significance(table)
    assert result is not None and result["against"] == "rrd"
    assert result["p"] < 0.05 and result["mean_diff"] == pytest.approx(0.0042)


def test_a_tuned_target_is_tested_against_every_other_method_s_best_configuration() -> None:
    runs = [_run("cd", s, 0.017) for s in range(4)]
    runs += [_run("cd:weight=2", s, 0.018 + 0.0001 * s) for s in range(4)]  # another method's tuned λ: a competitor
    runs += [_run("rcekd", s, 0.025) for s in range(4)]  # the target's own method, untuned: not one
    runs += [_run("rcekd:weight=125", s, 0.019 + 0.0003 * s) for s in range(4)]
    table = summarise(runs, ["cd", "cd:weight=2", "rcekd", "rcekd:weight=125"])
    result = significance(table, "rcekd:weight=125")
    assert result is not None and result["target"] == "rcekd:weight=125" and result["against"] == "cd:weight=2"
    assert result["mean_diff"] == pytest.approx(0.0013)
    assert significance(table)["against"] == "cd:weight=2"  # the default target, rcekd, meets it too


def test_no_significance_claim_when_the_target_is_worse() -> None:
    runs = [_run("rrd", s, 0.02 + 0.001 * s) for s in range(3)] + [_run("rcekd", s, 0.01) for s in range(3)]
    result = significance(summarise(runs, ["rrd", "rcekd"]))
    assert result is not None and result["p"] > 0.5


def test_variants_are_compared_with_the_full_method_on_shared_seeds() -> None:
    runs = [_run("rcekd", s, 0.019) for s in range(3)]
    runs += [_run("rcekd:ablation=wo_s", s, 0.017) for s in range(3)]
    runs += [_run("rcekd:gamma_mode=sampled", s, 0.018 + 0.002 * s) for s in range(2)]  # seeds 0, 1 only
    table = summarise(runs, ["rcekd", "rcekd:ablation=wo_s", "rcekd:gamma_mode=sampled"])
    result = against_full(table)
    assert result["rcekd:ablation=wo_s"] == {"seeds": 3, "mean_diff": pytest.approx(-0.002), "below": 3}
    assert result["rcekd:gamma_mode=sampled"]["seeds"] == 2
    assert result["rcekd:gamma_mode=sampled"]["below"] == 1


def test_the_results_file_says_which_requested_runs_are_missing() -> None:
    runs = [_run("none", s, 0.01) for s in range(2)] + [_run("rcekd", 0, 0.02)]
    table = summarise(runs, ["none", "rcekd"])
    complete = quality.markdown("x", table, significance(table), "cmd", [], "")
    assert "Partial" not in complete and "| rcekd | 1 |" in complete
    partial = quality.markdown("x", table, significance(table), "cmd", [("rcekd", 1)], "")
    assert "Partial: 1 requested runs have not finished (rcekd seed 1)." in partial


def _settings(**changes: object) -> dict:
    settings = {key: 1 for key in SAME_BUDGET} | {"teacher": "runs/teachers/t", "seeds": [0, 1]}
    return settings | changes


def test_committed_runs_stand_in_only_under_the_same_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(quality, "RESULTS", tmp_path)
    assert committed_runs("missing", _settings()) == {}
    saved = {
        "machine": {"code": "abc1234"},
        "settings": _settings(),
        "runs": [_run("cd", 0, 0.02), _run("cd", 1, 0.03)],
    }
    (tmp_path / "quality_x.json").write_text(json.dumps(saved))
    runs = committed_runs("x", _settings(seeds=[0, 1, 2]))  # more seeds: same budget
    assert set(runs) == {("cd", 0), ("cd", 1)}
    assert runs[("cd", 1)]["code"] == "abc1234" and runs[("cd", 1)]["metrics"]["test"]["ndcg@20"] == 0.03
    with pytest.raises(SystemExit, match="patience"):
        committed_runs("x", _settings(patience=20))


def test_a_run_logs_each_epoch_while_it_trains_and_reads_back_its_metrics(
    tmp_path: Path, tiny_dataset_dir: Path
) -> None:
    teacher = tmp_path / "teacher"
    assert cli.main(train_args(tiny_dataset_dir, teacher)) == 0
    out = tmp_path / "quality" / "cd__weight-1.0-s0"  # a dot in the name: the log must not replace it
    job = {
        "variant": "cd:weight=1.0", "seed": 0, "data": str(tiny_dataset_dir), "teacher": str(teacher),
        "student": "mf", "dim": 4, "epochs": 4, "eval_every": 2, "patience": 10, "batch_size": 256,
        "lr": 1e-2, "weight_decay": 0.0, "threads": 1, "out": str(out), "code": "abc1234",
    }  # fmt: skip
    result = quality.run_one(job)
    lines = [json.loads(line) for line in quality.progress_path(out).read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [1, 2, 3, 4]
    assert [line["valid_ndcg"] is not None for line in lines] == [False, True, False, True]
    assert all(line["max_epochs"] == 4 and line["time"] > 0 for line in lines)
    assert result["variant"] == "cd:weight=1.0" and result["code"] == "abc1234" and result["epochs_run"] == 4
    assert result["kd"]["weight"] == 1.0
    assert [epoch for epoch, _, _ in result["train_curve"]] == [1, 2, 3, 4]
    assert all(loss > 0 for _, loss, _ in result["train_curve"])


def test_the_results_file_names_the_machines_that_made_the_runs() -> None:
    zen = {"cpu": "AMD EPYC", "torch_cpu_capability": "AVX2", "numba_target": "znver3"}
    runs = [_run("rcekd", 0, 0.02) | {"platform": zen}, _run("rcekd", 1, 0.02) | {"platform": zen}]
    runs.append(_run("rcekd", 2, 0.02))  # made before runs recorded their machine
    table = summarise(runs, ["rcekd"])
    text = quality.markdown("x", table, None, "cmd", [], "", runs)
    assert "Machines that made the runs: AMD EPYC, torch AVX2, numba znver3 (2 runs); not recorded (1 runs)." in text
    unrecorded = quality.markdown("x", table, None, "cmd", [], "", runs[2:])
    assert "Machines that made the runs" not in unrecorded
