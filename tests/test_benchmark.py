"""tools/benchmark.py: the Table-4 statistics on synthetic records, and a CPU smoke run of baseline vs LET."""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_let.apps import benchmark
from megatron_let.apps.benchmark import BenchmarkError, analyse, extrapolate, method_order, run_order, split_phases

from conftest import REPO, tiny_config, write_config

# ------------------------------------------------------------------------------ synthetic records

TRAIN_ITERS, STOP, WARMUP = 10, 4, 1
TOKENS = 8 * 64  # tokens per step


def synthetic_run(let: bool, repeat: int, memory: bool = True) -> list[dict]:
    """Iterations 1..10; LET aligns at 1..4 (λ = 0.1·(4 − s)/4), is slower and heavier while it does."""
    records = []
    for i in range(1, TRAIN_ITERS + 1):
        lam = 0.1 * max(0.0, (STOP - (i - 1)) / STOP) if let else 0.0
        time_ = 1.0 + 0.01 * ((i * 7 + repeat * 3) % 5) + (0.5 if i == 1 else 0.0)  # slow first step
        flop = 10.0 + (2.0 if let and lam > 0 else 0.0)  # TFLOP per GPU per step
        if let and lam > 0:
            time_ += 0.1 + 0.001 * i
        record = {
            "iteration": i,
            "lambda": lam,
            "step_time_s": time_,
            "tokens_per_s": TOKENS / time_,
            "tflops_per_gpu": flop / time_,
            "lm_loss": 5.0,
            "alignment_loss": -0.1 if lam > 0 else None,
        }
        if memory:
            record["peak_memory_allocated_gib"] = 20.0 + i * 0.01 + (3.0 if let and lam > 0 else 0.0)
            record["peak_memory_reserved_gib"] = 24.0 + (3.5 if let and lam > 0 else 0.0)
        records.append(record)
    return records


def test_run_order_alternates():
    assert run_order(3) == ["let", "baseline", "baseline", "let", "let", "baseline"]


def test_phase_statistics_against_an_independent_reference():
    let_runs = [synthetic_run(True, r) for r in range(2)]
    base_runs = [synthetic_run(False, r) for r in range(2)]
    result = analyse(let_runs, base_runs, WARMUP, projection=(100, 20))

    during, after = [2, 3, 4], [6, 7, 8, 9, 10]  # 1 = warm-up, 5 = release (λ = 0 from iteration 5)
    assert result["iterations"]["release_iteration"] == 5
    assert result["during"]["iterations"] == during and result["after"]["iterations"] == after

    def pooled(runs, iterations, key):
        return [r[key] for run in runs for r in run if r["iteration"] in iterations]

    medians = {}
    for phase, its in (("during", during), ("after", after)):
        for variant, runs in (("let", let_runs), ("baseline", base_runs)):
            got = result[phase][variant]
            for key in ("step_time_s", "tokens_per_s", "tflops_per_gpu"):
                values = pooled(runs, its, key)
                assert got[key]["median"] == pytest.approx(statistics.median(values), rel=1e-12)
                assert got[key]["min"] == min(values) and got[key]["max"] == max(values)
                assert got[key]["n"] == len(its) * 2
                quartiles = statistics.quantiles(values, n=4, method="inclusive")
                assert (got[key]["p25"], got[key]["p75"]) == pytest.approx((quartiles[0], quartiles[2]))
            for key in ("peak_memory_allocated_gib", "peak_memory_reserved_gib"):
                assert got[key] == max(pooled(runs, its, key))
            assert got["per_repeat_median_step_time_s"] == pytest.approx(
                [statistics.median(r["step_time_s"] for r in run if r["iteration"] in its) for run in runs]
            )
            medians[phase, variant] = statistics.median(pooled(runs, its, "step_time_s"))
        ratios = result[phase]["ratios"]
        assert ratios["throughput"] == pytest.approx(medians[phase, "baseline"] / medians[phase, "let"])
        for key, name in (
            ("peak_memory_allocated_gib", "peak_memory_allocated"),
            ("peak_memory_reserved_gib", "peak_memory_reserved"),
        ):
            assert ratios[name] == pytest.approx(max(pooled(let_runs, its, key)) / max(pooled(base_runs, its, key)))
        tok = [statistics.median(pooled(runs, its, "tokens_per_s")) for runs in (let_runs, base_runs)]
        assert ratios["tokens_per_s"] == pytest.approx(tok[0] / tok[1])

    # Memory: LET's peak during alignment is above the baseline's, and equal to it after S_stop.
    assert result["during"]["ratios"]["peak_memory_reserved"] == pytest.approx(27.5 / 24.0)
    assert result["after"]["ratios"]["peak_memory_reserved"] == pytest.approx(1.0)

    # Run-averaged: the time-weighted phases' medians over T iterations, S of which align.
    for key, (t_iters, s_stop) in (("run_averaged", (TRAIN_ITERS, STOP)), ("run_averaged_projected", (100, 20))):
        entry = result[key]
        assert (entry["train_iters"], entry["stop_step"]) == (t_iters, s_stop)
        avg = {}
        for variant in ("let", "baseline"):
            t_during, t_after = medians["during", variant], medians["after", variant]
            avg[variant] = (s_stop * t_during + (t_iters - s_stop) * t_after) / t_iters
            assert entry[variant]["step_time_s"]["median"] == pytest.approx(avg[variant])
            assert entry[variant]["tokens_per_s"]["median"] == pytest.approx(TOKENS / avg[variant])
            flop = (s_stop * (12.0 if variant == "let" else 10.0) + (t_iters - s_stop) * 10.0) / t_iters
            assert entry[variant]["tflops_per_gpu"]["median"] == pytest.approx(flop / avg[variant])
        assert entry["ratios"]["throughput"] == pytest.approx(avg["baseline"] / avg["let"])
        assert entry["let"]["peak_memory_reserved_gib"] == 27.5


def test_missing_memory_is_not_available():
    result = analyse([synthetic_run(True, 0, memory=False)], [synthetic_run(False, 0, memory=False)], WARMUP)
    for phase in ("during", "after", "run_averaged"):
        assert result[phase]["let"]["peak_memory_allocated_gib"] is None
        assert result[phase]["ratios"]["peak_memory_reserved"] is None
    assert "n/a" in "\n".join(benchmark.format_block(result, 1))


def test_phase_split_rejects_a_run_that_never_aligns():
    with pytest.raises(BenchmarkError, match="never aligned"):
        split_phases([synthetic_run(False, 0)], WARMUP)


def test_extrapolation_is_exact_for_linear_costs():
    def scaled(run, layers):  # step time and memory: fixed + per-layer parts
        return [
            {
                **r,
                "step_time_s": r["step_time_s"] * (1 + layers),
                "tokens_per_s": r["tokens_per_s"] / (1 + layers),
                "peak_memory_allocated_gib": 2.0 * layers + (1.0 if r["lambda"] > 0 else 0.0),
                "peak_memory_reserved_gib": 3.0 * layers,
            }
            for r in run
        ]

    by_layers = {}
    for layers in (4, 8):
        by_layers[layers] = analyse(
            [scaled(synthetic_run(True, 0), layers)], [scaled(synthetic_run(False, 0), layers)], WARMUP
        )
    extra = extrapolate(by_layers, 32)
    base4 = by_layers[4]["during"]["baseline"]["step_time_s"]["median"] / 5  # the unscaled median
    assert extra["during"]["baseline"]["step_time_s"]["median"] == pytest.approx(base4 * 33)
    assert extra["during"]["let"]["peak_memory_allocated_gib"] == pytest.approx(65.0)
    assert extra["after"]["ratios"]["peak_memory_allocated"] == pytest.approx(1.0)
    assert extra["per_layer"]["during"]["baseline"]["step_time_s"]["per_layer"] == pytest.approx(base4)
    assert extra["run_averaged"]["train_iters"] == TRAIN_ITERS


def test_method_order_rotates_the_first_method():
    assert method_order(["nll", "kd", "hldf"], 3) == ["nll", "kd", "hldf", "kd", "hldf", "nll", "hldf", "nll", "kd"]


def test_methods_need_nll_and_known_names(capsys):
    for methods, named in (("kd", "nll"), ("nll,kd,lett", "lett"), ("nll,kd,kd", "kd given more than once")):
        with pytest.raises(SystemExit) as exit_:
            benchmark.main(["--config", "x.yaml", "--methods", methods])
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert "--methods" in err and named in err, err
    assert benchmark.main(["--config", "x.yaml", "--methods", "nll,kd", "--set", "method=kd"]) == 1
    assert "use --methods" in capsys.readouterr().err


def test_reserved_keys_are_refused(capsys):
    assert benchmark.main(["--config", "x.yaml", "--set", "training.train_iters=5"]) == 1
    assert "use --train-iters" in capsys.readouterr().err


# ------------------------------------------------------------------------------ real runs on the CPU


def _benchmark(tmp_path: Path, *extra: str, iters: int = 12, stop: int = 5) -> subprocess.CompletedProcess:
    config = write_config(tmp_path / "tiny.yaml", tiny_config(tmp_path / "no-data"))
    cmd = [
        sys.executable,
        str(REPO / "tools" / "benchmark.py"),
        "--config",
        str(config),
        "--mock-data",
        "--nproc-per-node",
        "1",
        "--train-iters",
        str(iters),
        "--stop-step",
        str(stop),
        "--repeats",
        "1",
        "--warmup",
        "1",
        "--output-dir",
        str(tmp_path / "runs"),
        "--json-out",
        str(tmp_path / "bench.json"),
        "--run-timeout",
        "300",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)


def test_benchmark_on_cpu(tmp_path):
    result = _benchmark(tmp_path, "--project-train-iters", "100", "--project-stop-step", "20")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout
    for title in (
        "during alignment — iterations 2–5",
        "after S_stop — iterations 7–12",
        "run-averaged — T = 12 iterations, S_stop = 5",
        "run-averaged, projected — T = 100",
    ):
        assert title in out, out
    assert "throughput" in out and "peak memory allocated" in out
    assert "starting LET (repeat 1/1)" in out and "baseline (repeat 1/1): exit status 0" in out

    report = json.loads((tmp_path / "bench.json").read_text())
    runs = {r["variant"]: r for r in report["runs"]}
    assert [r["variant"] for r in report["runs"]] == ["let", "baseline"]
    records = {}
    for variant, run in runs.items():
        path = Path(run["metrics"])
        assert path.is_relative_to(tmp_path / "runs") and path.exists()
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        records[variant] = {r["iteration"]: r for r in lines if r.get("split", "train") == "train"}
        assert sorted(records[variant]) == list(range(1, 13))
    assert all(records["let"][i]["lambda"] > 0 for i in range(1, 6))
    assert all(records["let"][i]["lambda"] == 0 for i in range(6, 13))
    assert all(records["baseline"][i]["lambda"] == 0 for i in range(1, 13))

    phases = report["results"][0]["phases"]
    median = {}
    for phase, its in (("during", range(2, 6)), ("after", range(7, 13))):
        for variant in ("let", "baseline"):
            median[phase, variant] = statistics.median(records[variant][i]["step_time_s"] for i in its)
            got = phases[phase][variant]
            assert got["step_time_s"]["median"] == pytest.approx(median[phase, variant], rel=1e-12)
            assert got["tokens_per_s"]["median"] == pytest.approx(
                statistics.median(records[variant][i]["tokens_per_s"] for i in its), rel=1e-12
            )
            assert got["peak_memory_allocated_gib"] is None  # CPU: no memory figures
        assert phases[phase]["ratios"]["throughput"] == pytest.approx(
            median[phase, "baseline"] / median[phase, "let"], rel=1e-12
        )
        assert f"throughput {phases[phase]['ratios']['throughput']:.3f}" in out
    for variant in ("let", "baseline"):
        averaged = (5 * median["during", variant] + 7 * median["after", variant]) / 12
        assert phases["run_averaged"][variant]["step_time_s"]["median"] == pytest.approx(averaged, rel=1e-12)
        projected = (20 * median["during", variant] + 80 * median["after", variant]) / 100
        assert phases["run_averaged_projected"][variant]["step_time_s"]["median"] == pytest.approx(projected)
    # LET counts the teacher's forward in its FLOPs while it aligns: more FLOP per step than the baseline.
    flop = {v: records[v][3]["tflops_per_gpu"] * records[v][3]["step_time_s"] for v in ("let", "baseline")}
    assert flop["let"] > flop["baseline"]


def test_a_failing_run_is_named_with_its_output(tmp_path):
    result = _benchmark(tmp_path, "--set", "model.hidden_sise=64", iters=4, stop=2)
    assert result.returncode == 1
    assert "run LET (repeat 1/1) failed with exit status" in result.stderr, result.stderr
    assert "hidden_sise" in result.stderr  # the tail of the run's own output
    assert "starting LET (repeat 1/1)" in result.stdout and "starting baseline" not in result.stdout
    assert not (tmp_path / "bench.json").exists()


def test_every_method_on_cpu(tmp_path):
    """--methods nll,kd,hldf: each method's figures from its own metrics.jsonl, its FLOPs from the accounting."""
    from megatron_let.objectives import cost_schedule
    from megatron_let.run_config import load_run_config

    iters, methods = 5, ("nll", "kd", "hldf")
    result = _benchmark(tmp_path, "--methods", ",".join(methods), iters=iters)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [r["variant"] for r in report["runs"]] == list(methods)
    figures = report["methods"]["per_method"]
    assert list(figures) == list(methods) and figures["hldf"]["label"] == "hldf (phase 1)"

    measured = range(2, iters + 1)  # iteration 1 is warm-up
    records, median = {}, {}
    for run in report["runs"]:
        method, path = run["variant"], Path(run["metrics"])
        assert path == tmp_path / "runs" / f"{method}_r1" / "metrics.jsonl"
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        records[method] = {r["iteration"]: r for r in lines if r.get("split", "train") == "train"}
        assert sorted(records[method]) == list(range(1, iters + 1))
        got = figures[method]
        for key in ("step_time_s", "tokens_per_s", "tflops_per_gpu"):
            values = [records[method][i][key] for i in measured]
            median[method, key] = statistics.median(values)
            assert got[key]["median"] == pytest.approx(median[method, key], rel=1e-12)
            assert (got[key]["min"], got[key]["max"]) == (min(values), max(values))
            quartiles = statistics.quantiles(values, n=4, method="inclusive")
            assert (got[key]["p25"], got[key]["p75"]) == pytest.approx((quartiles[0], quartiles[2]))
        assert got["peak_memory_allocated_gib"] is None and got["ratios"]["peak_memory_reserved"] is None  # CPU
    # In the costly phase at every iteration: KD's weight alpha throughout, HLDF's phase 1 (weight 1) throughout.
    assert all(records["nll"][i]["lambda"] == 0 for i in range(1, iters + 1))
    assert all(records["kd"][i]["lambda"] == 0.5 for i in range(1, iters + 1))
    assert all(records["hldf"][i]["lambda"] == 1.0 for i in range(1, iters + 1))
    assert "HLDF phase 2" not in Path(report["runs"][2]["log"]).read_text()

    for method in methods:
        ratios = figures[method]["ratios"]
        throughput = median["nll", "step_time_s"] / median[method, "step_time_s"]
        assert ratios["throughput"] == pytest.approx(throughput, rel=1e-12)
        for key in ("tokens_per_s", "tflops_per_gpu"):
            assert ratios[key] == pytest.approx(median[method, key] / median["nll", key], rel=1e-12)
        assert f"{throughput:.3f}" in out

    # Counted FLOPs per token: the accounting of the config each run was given, loaded here.
    own_sets = {
        "nll": ["method=nll", "alignment.enabled=false"],
        "kd": ["method=kd", "alignment.enabled=false"],
        "hldf": ["method=hldf", "alignment.enabled=false", f"hld.phase1_iters={iters + 1}"],
    }
    counted = {}
    for method, sets in own_sets.items():
        cfg = load_run_config(tmp_path / "tiny.yaml", ["data.mock_data=true", f"training.train_iters={iters}", *sets])
        for convention in ("paper", "megatron"):
            cost = cost_schedule(cfg, convention).at(0)
            counted[method, convention] = cost.total
            got = figures[method]["flops_per_token"][convention]
            assert got["total"] == pytest.approx(cost.total, rel=1e-12)
            assert (got["student"], got["teacher"], got["regressor"]) == pytest.approx(
                (cost.student, cost.teacher, cost.regressor), rel=1e-12
            )
    for method in methods:
        for convention in ("paper", "megatron"):
            ratio = counted[method, convention] / counted["nll", convention]
            assert figures[method]["counted_flops_ratio"][convention] == pytest.approx(ratio, rel=1e-12)
            assert f"{ratio:.3f}" in out
    for convention in ("paper", "megatron"):
        # KD adds the teacher's forward; HLDF's phase 1 runs half the student and no output layer.
        assert counted["kd", convention] > counted["nll", convention]
        assert counted["hldf", convention] < counted["kd", convention]
    assert figures["nll"]["flops_per_token"]["paper"]["teacher"] == 0
    assert figures["kd"]["flops_per_token"]["paper"]["teacher"] > 0
    for row in ("hldf (phase 1)", "FLOPs/token (paper A.9)", "FLOPs/token (Megatron-LM)", "counted FLOPs ratio to nll"):
        assert row in out, out
