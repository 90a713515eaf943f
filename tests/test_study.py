"""`megatron-let study`: a small grid (2 methods × 2 learning rates, a few steps) run through the
CLI, its report checked against the runs' own metrics, rerun (complete runs skipped), one run
interrupted after a checkpoint and resumed, and a changed study refused."""

import json
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, tiny_config, write_config


def study_cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "megatron_let.cli", "study", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
        timeout=900,
    )


def metrics(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = {r["iteration"]: r for r in rows if "split" not in r}
    valid = {r["iteration"]: r for r in rows if r.get("split") == "valid"}
    test = [r for r in rows if r.get("split") == "test"]
    return train, valid, test[-1]["lm_loss"]


@pytest.fixture(scope="module")
def study(tmp_path_factory, token_data):
    tmp = tmp_path_factory.mktemp("study")
    base = tiny_config(token_data, distillation={"top_k": 16}, checkpoint={"save_interval": 2})
    write_config(tmp / "base.yaml", base)
    spec = {
        "name": "tiny study",
        "work_dir": "work",
        "config": "base.yaml",
        "budget": {"steps": 4},
        "methods": ["nll", "kd"],
        "grid": {"optimizer.lr": [1e-3, 3e-3], "distillation.alpha": [0.5]},
        "baseline": "nll",
        "reference": "kd",
        "eval": {"interval": 2, "iters": 1},
    }
    write_config(tmp / "study.yaml", spec)
    first = study_cli("--config", "study.yaml", cwd=tmp)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    return tmp, first


def test_the_grid_runs_and_the_report_follows_from_the_runs_metrics(study):
    tmp, first = study
    work = tmp / "work"
    runs = sorted(p.name for p in (work / "runs").iterdir())
    # The grid keys each method reads: nll ignores distillation.alpha (one run per lr).
    assert runs == sorted(["nll__lr_0.001", "nll__lr_0.003", "kd__lr_0.001__alpha_0.5", "kd__lr_0.003__alpha_0.5"])
    for name in runs:
        cfg = yaml.safe_load((work / "configs" / f"{name}.yaml").read_text())
        assert cfg["optimizer"]["lr"] == (1e-3 if "lr_0.001" in name else 3e-3)
        assert cfg["method"] == name.split("__")[0] and cfg["training"]["train_iters"] == 4
    results = {name: metrics(work / "runs" / name) for name in runs}
    summary = json.loads((work / "report" / "summary.json").read_text())
    for variant in ("nll", "kd"):
        mine = {n: r for n, r in results.items() if n.startswith(variant + "__")}
        best = min(mine, key=lambda n: mine[n][1][4]["lm_loss"])  # chosen on the final validation loss
        assert summary["best"][variant]["run"] == best
        assert summary["best"][variant]["test_loss"] == mine[best][2]
    # Pointwise: kd − nll... the other way round: each nll run minus kd at its learning rate.
    pairs = {(p["run"], p["reference_run"]): p["difference"] for p in summary["pointwise"]}
    for lr in ("0.001", "0.003"):
        nll, kd = results[f"nll__lr_{lr}"][2], results[f"kd__lr_{lr}__alpha_0.5"][2]
        assert pairs[f"nll__lr_{lr}", f"kd__lr_{lr}__alpha_0.5"] == pytest.approx(nll - kd)
    assert len(pairs) == 2  # never across learning rates
    # Speedup: the first evaluation at or below the baseline's final validation loss, and its FLOPs.
    target = results[summary["best"]["nll"]["run"]][1][4]["lm_loss"]
    for variant, reached in summary["speedup"].items():
        train, valid, _ = results[summary["best"][variant]["run"]]
        step = min(i for i, r in valid.items() if r["lm_loss"] <= target)
        assert reached == {"steps": step, "flops": train[step]["flops_total"]}
    report = (work / "report" / "report.md").read_text()
    for heading in ("## All runs", "Tables 1/5", "## Speedup", "Table 1 layout", "## Pointwise against kd"):
        assert heading in report
    for png in ("loss_vs_flops.png", "pointwise.png"):
        assert (work / "report" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "[4/4]" in first.stdout


def test_a_rerun_skips_complete_runs_and_resumes_an_interrupted_one(study):
    tmp, _ = study
    work = tmp / "work"
    run = work / "runs" / "kd__lr_0.003__alpha_0.5"
    before = metrics(run)
    # As if killed after its iteration-2 checkpoint: no DONE, no later checkpoint, no later records.
    (run / "DONE.json").unlink()
    shutil.rmtree(run / "iter_0000004")
    (run / "latest_checkpointed_iteration.txt").write_text("2\n")
    kept = [line for line in (run / "metrics.jsonl").read_text().splitlines() if json.loads(line)["iteration"] <= 2]
    kept = [line for line in kept if json.loads(line).get("split") != "test"]
    (run / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    again = study_cli("--config", "study.yaml", cwd=tmp)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert again.stdout.count("complete, skipped") == 3
    assert "kd__lr_0.003__alpha_0.5: training (resuming from its checkpoint)" in again.stdout
    after = metrics(run)
    for iteration in (3, 4):
        assert after[0][iteration]["lm_loss"] == pytest.approx(before[0][iteration]["lm_loss"], rel=1e-6)
    assert after[2] == pytest.approx(before[2], rel=1e-6)


def test_a_changed_study_is_refused_and_bad_files_named(study):
    tmp, _ = study
    spec = yaml.safe_load((tmp / "study.yaml").read_text())
    spec["overrides"] = {"training": {"seed": 7}}
    write_config(tmp / "changed.yaml", spec)
    changed = study_cli("--config", "changed.yaml", cwd=tmp)
    assert changed.returncode == 2 and "was set up with another config" in changed.stderr
    report_only = study_cli("--config", "changed.yaml", "--report-only", cwd=tmp)  # nor reported as its
    assert report_only.returncode == 2 and "was set up with another config" in report_only.stderr
    spec = yaml.safe_load((tmp / "study.yaml").read_text())
    spec["reference"] = "hldc"
    write_config(tmp / "bad.yaml", spec)
    bad = study_cli("--config", "bad.yaml", cwd=tmp)
    assert bad.returncode == 2 and "bad.yaml: reference: 'hldc' is not one of the methods (nll, kd)" in bad.stderr
    spec = yaml.safe_load((tmp / "study.yaml").read_text())
    spec["work_dir"], spec["grid"] = "work2", {"distillation.top_k": [100000]}
    write_config(tmp / "badkey.yaml", spec)
    badkey = study_cli("--config", "badkey.yaml", cwd=tmp)
    assert badkey.returncode == 2 and "run kd__top_k_100000" in badkey.stderr and "distillation.top_k" in badkey.stderr
    assert "Traceback" not in changed.stderr + bad.stderr + badkey.stderr


@pytest.mark.parametrize("example", ["study_let_tiny", "study_hld_tiny"])
def test_the_shipped_studies_run_at_their_methods_and_grid_keys(example, tmp_path_factory, quickstart_smoke):
    """examples/study_*.yaml as shipped — their methods, grid keys, overrides, baseline and
    reference — on the quickstart's smoke corpus and teacher (`megatron-let quickstart --smoke`'s
    directory, reused), 2 steps per run and the first value of each grid key: every run trains and
    the report tabulates every method."""
    shared = quickstart_smoke[0]
    tmp = tmp_path_factory.mktemp(example)
    spec = yaml.safe_load((REPO / "examples" / f"{example}.yaml").read_text())
    assert set(spec["quickstart"]) <= {"work_dir", "smoke", "max_docs"}
    spec["quickstart"] = {"smoke": True, "max_docs": 40, "work_dir": str(shared)}
    spec["budget"] = {"steps": 2}
    spec["grid"] = {key: values[:1] for key, values in spec["grid"].items()}
    if "hld.phase1_fraction" in spec["grid"]:  # P1 of a 2-step run: one phase-1 step
        spec["grid"]["hld.phase1_fraction"] = [0.5]
    spec["eval"] = {"interval": 1, "iters": 1}
    spec["work_dir"] = str(tmp / "work")
    if example == "study_let_tiny":  # lm-eval on two methods' exported checkpoints (the quickstart's tokenizer)
        spec["downstream"] = {"tasks": "ARC-e", "limit": 2, "methods": [spec["baseline"], "let"]}
    write_config(tmp / "study.yaml", spec)
    result = study_cli("--config", "study.yaml", cwd=tmp)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads((tmp / "work" / "report" / "summary.json").read_text())
    methods = spec["methods"] if isinstance(spec["methods"], list) else list(spec["methods"])
    assert sorted(summary["best"]) == sorted(methods)
    for name in summary["runs"]:
        cfg = yaml.safe_load((tmp / "work" / "configs" / f"{name}.yaml").read_text())
        assert cfg["teacher"]["load"] == str(shared / "runs" / "teacher")
    if "downstream" in spec:
        report = (tmp / "work" / "report" / "report.md").read_text()
        assert "| method | test loss | Δ vs baseline | ARC-e | Avg. | relative gain |" in report
        for variant in spec["downstream"]["methods"]:
            scores = json.loads(
                (tmp / "work" / "runs" / summary["best"][variant]["run"] / "downstream.json").read_text()
            )
            assert f"| {variant} | {summary['best'][variant]['test_loss']:.4f} |" in report
            assert f"| {scores['table']['ARC-e']:.1f} |" in report
