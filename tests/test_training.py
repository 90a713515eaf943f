"""The trainer as a user runs it: λ schedule and teacher release, resume, SIGTERM, evaluation, CLI."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_let.alignment import alignment_weight

from conftest import REPO, tiny_config, torchrun, write_config


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_lambda_reaches_zero_at_s_stop_and_teacher_is_released(tmp_path, token_data):
    """PP=2 with layer k on stage 1: only stage 1 holds a teacher; from S_stop on λ = 0 and the
    teacher, its hook and its memory are gone on every rank."""
    cfg = write_config(
        tmp_path / "run.yaml",
        tiny_config(
            token_data,
            alignment={"stop_step": 2},
            training={"train_iters": 4},
            parallel={"pipeline_model_parallel_size": 2},
        ),
    )
    torchrun(2, "tests/harness/schedule_check.py", "--config", str(cfg), "--out", str(tmp_path))
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["owner"] for r in reports] == [False, True]
    owner = reports[1]
    assert owner["hooks_before"] == 1 and owner["hooks_after"] == 0 and owner["teacher_memory_freed"]
    for report in reports:
        steps = report["steps"]
        assert [s["lambda"] for s in steps] == [alignment_weight(s, 0.1, 2) for s in range(4)]
        assert [s["alignment_loss"] is not None for s in steps] == [True, True, False, False]
        assert not any(s["teacher_present"] for s in steps[2:])
        assert all(s["lm_loss"] is not None for s in steps)


@pytest.mark.parametrize("async_save", [False, True], ids=["save", "async_save"])
def test_resume_continues_the_same_loss_curve(tmp_path, token_data, async_save):
    """6 steps straight == 3 steps, exit, restart from the checkpoint, 3 more (DP=2, crossing S_stop
    after the restart), including the held-out evaluation. The resumed run also saves every 2 steps
    keeping the last 2 — with ``async_save`` in the background while it trains on, each checkpoint
    appearing (renamed, tracked) when its write finalizes."""
    common = dict(
        alignment={"stop_step": 4},
        training={"train_iters": 6, "global_batch_size": 8},
        eval={"eval_interval": 3, "eval_iters": 2, "test_at_end": True},
    )
    straight = write_config(
        tmp_path / "straight.yaml", tiny_config(token_data, checkpoint={"save": str(tmp_path / "straight")}, **common)
    )
    resumed = write_config(
        tmp_path / "resumed.yaml",
        tiny_config(
            token_data,
            checkpoint={
                "save": str(tmp_path / "resumed"),
                "load": str(tmp_path / "resumed"),
                "save_interval": 2,
                "keep_last": 2,
                "async_save": async_save,
            },
            **common,
        ),
    )
    torchrun(2, "-m megatron_let.train", "--config", str(straight))
    first = torchrun(2, "-m megatron_let.train", "--config", str(resumed), "--set", "training.exit_interval=3")
    assert "exit interval reached: saved at iteration 3, exiting" in first.stdout
    assert (tmp_path / "resumed" / "latest_checkpointed_iteration.txt").read_text().strip() == "3"
    second = torchrun(2, "-m megatron_let.train", "--config", str(resumed))
    assert "at iteration 3" in second.stdout and "teacher released" in second.stdout
    if async_save:
        assert "writing checkpoint" in first.stdout and "in the background" in second.stdout
    saved = sorted(p.name for p in (tmp_path / "resumed").glob("iter_*"))
    assert saved == ["iter_0000004", "iter_0000006"]
    assert (tmp_path / "resumed" / "latest_checkpointed_iteration.txt").read_text().strip() == "6"

    a = read_jsonl(tmp_path / "straight" / "metrics.jsonl")
    b = read_jsonl(tmp_path / "resumed" / "metrics.jsonl")
    train_a = [r for r in a if "split" not in r]
    train_b = [r for r in b if "split" not in r]
    assert [r["iteration"] for r in train_b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(train_a, train_b):
        for key in ("lm_loss", "alignment_loss", "lambda", "lr", "grad_norm", "flops_total"):
            if ra[key] is None:
                assert rb[key] is None
            else:
                assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-9), (ra["iteration"], key)
    evals_a = [r for r in a if r.get("split")]
    evals_b = [r for r in b if r.get("split")]
    assert [(r["split"], r["iteration"]) for r in evals_a] == [("valid", 3), ("valid", 6), ("test", 6)]
    for ra, rb in zip(evals_a, evals_b):
        assert rb["lm_loss"] == pytest.approx(ra["lm_loss"], rel=1e-6)
        assert ra["perplexity"] == pytest.approx(math.exp(ra["lm_loss"]), rel=1e-9)


def test_sigterm_saves_after_the_current_step_and_exits_zero(tmp_path, token_data):
    cfg = write_config(
        tmp_path / "run.yaml",
        tiny_config(token_data, training={"train_iters": 100000}, checkpoint={"save": str(tmp_path / "ckpt")}),
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "megatron_let.train", "--config", str(cfg)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=REPO,
    )
    metrics = tmp_path / "ckpt" / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and (not metrics.exists() or len(read_jsonl(metrics)) < 2):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, output[-3000:]
    last = read_jsonl(metrics)[-1]["iteration"]
    assert f"SIGTERM received: saved at iteration {last}, exiting" in output
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text().strip() == str(last)
    assert (tmp_path / "ckpt" / f"iter_{last:07d}" / "metadata.json").exists()
    assert not list((tmp_path / "ckpt").glob("*.tmp"))


def test_cli_reports_config_errors(tmp_path, token_data):
    cfg = tiny_config(token_data)
    cfg["alignment"]["target_layer"] = 9
    path = write_config(tmp_path / "bad.yaml", cfg)
    result = subprocess.run(
        [sys.executable, "-m", "megatron_let.cli", "train", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 2
    assert "alignment.target_layer" in result.stderr and "bad.yaml" in result.stderr


def test_teacher_architecture_comes_from_its_checkpoint(tmp_path, token_data):
    from megatron_let.config import ConfigError
    from megatron_let.run_config import load_run_config as load_config

    teacher = tiny_config(
        token_data,
        teacher=None,
        training={"train_iters": 0},
        model={
            "num_layers": 2,
            "hidden_size": 48,
            "num_attention_heads": 3,
            "num_query_groups": None,
            "normalization": "LayerNorm",
        },
        checkpoint={"save": str(tmp_path / "teacher")},
    )
    torchrun(1, "-m megatron_let.train", "--config", str(write_config(tmp_path / "t.yaml", teacher)))
    student = tiny_config(token_data)
    student["teacher"] = {"load": str(tmp_path / "teacher")}
    cfg = load_config(write_config(tmp_path / "s.yaml", student))
    assert (cfg.teacher.model.hidden_size, cfg.teacher.model.num_attention_heads) == (48, 3)
    assert cfg.teacher.model.normalization == "LayerNorm"
    student["teacher"]["model"] = dict(teacher["model"], hidden_size=64, num_attention_heads=4)
    with pytest.raises(ConfigError, match=r"teacher\.model\.hidden_size: 64 differs from 48"):
        load_config(write_config(tmp_path / "s2.yaml", student))
    student["teacher"] = {"load": str(tmp_path / "missing")}
    with pytest.raises(ConfigError, match=r"teacher\.load: .*not a megatron-let checkpoint"):
        load_config(write_config(tmp_path / "s3.yaml", student))


def test_nan_gradients_stop_the_run_by_default(tmp_path, token_data):
    """parallel.check_for_nan_in_loss_and_grad (on, as in Megatron-LM): a NaN gradient stops the
    run in megatron DDP before it reaches the reduction and the weights; off, training goes on."""
    cfg = write_config(
        tmp_path / "nan.yaml",
        tiny_config(
            token_data,
            training={"train_iters": 3},
            model={"init_method_std": 1.0e30},
            optimizer={"clip_grad": 0.0},
            checkpoint={"save": str(tmp_path / "ckpt")},
        ),
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "megatron_let.train", "--config", str(cfg)]
    checked = subprocess.run(run, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert checked.returncode != 0 and "found NaN in local grad norm" in checked.stderr
    assert not (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").exists()
    unchecked = subprocess.run(
        run + ["--set", "parallel.check_for_nan_in_loss_and_grad=false"],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=300,
    )
    assert unchecked.returncode == 0, unchecked.stderr[-3000:]
    first, *later = read_jsonl(tmp_path / "ckpt" / "metrics.jsonl")
    assert math.isnan(first["grad_norm"]) and all(math.isnan(r["lm_loss"]) for r in later)  # the weights got it
