"""Stopping and restarting a run the way clusters do it, without Slurm: every process of the job
signalled at once, torchrun signalled, kills between saves, re-launches of finished runs."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO, free_port, tiny_config, torchrun, write_config

TRACKER = "latest_checkpointed_iteration.txt"


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_records(path):
    return [r for r in read_jsonl(path) if "split" not in r]


def launch(cfg, nproc=2, extra=()):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={nproc}",
        f"--master-port={free_port()}",
        "-m",
        "megatron_let.train",
        "--config",
        str(cfg),
        *extra,
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO, start_new_session=True
    )


def wait_for_iteration(metrics, iteration, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists() and len(train_records(metrics)) >= iteration:
            return
        if proc.poll() is not None:
            raise AssertionError(proc.stdout.read()[-4000:])
        time.sleep(0.2)
    raise AssertionError(f"no iteration {iteration} within {timeout} s")


def signal_job_step(launcher_pid, sig=signal.SIGTERM):
    """What Slurm does to a job step: the signal reaches every process of it at once — the
    training ranks and every helper they started (checkpoint writers, resource trackers) —
    but not the launcher (srun stays outside the step)."""
    processes = psutil.Process(launcher_pid).children(recursive=True)
    for process in processes:
        try:
            process.send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    return len(processes)


@pytest.mark.parametrize("async_save", [False, True], ids=["save", "async_save"])
def test_sigterm_to_every_process_after_periodic_saves_saves_and_resumes(tmp_path, token_data, async_save):
    """PP=2, a save every 2 iterations; SIGTERM to all processes of the job (as Slurm sends it)
    after several periodic saves: the current step finishes, a complete checkpoint of that
    iteration is written, both ranks exit 0; leftovers of a killed save are cleared on restart,
    and the resumed run's metrics have each iteration once and the straight run's losses.
    With ``async_save`` the signal also reaches the background writers of a save in flight."""
    ckpt = tmp_path / "ckpt"
    # train_iters fixes the sample count, hence megatron's shuffle: the same in all three runs.
    total = 40
    common = dict(
        training={"train_iters": total}, parallel={"pipeline_model_parallel_size": 2}, alignment={"stop_step": 12}
    )
    cfg = write_config(
        tmp_path / "run.yaml",
        tiny_config(
            token_data,
            checkpoint={"save": str(ckpt), "load": str(ckpt), "save_interval": 2, "async_save": async_save},
            **common,
        ),
    )
    proc = launch(cfg)
    wait_for_iteration(ckpt / "metrics.jsonl", 7, proc)
    assert signal_job_step(proc.pid) >= 4  # 2 ranks + their writer helpers
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-4000:]
    assert "BrokenPipe" not in output and "EOFError" not in output
    stopped = int((ckpt / TRACKER).read_text())
    assert f"SIGTERM received: saved at iteration {stopped}, exiting" in output
    assert total > stopped >= 7 and stopped == train_records(ckpt / "metrics.jsonl")[-1]["iteration"]
    assert (ckpt / f"iter_{stopped:07d}" / ".metadata").exists()
    assert not list(ckpt.glob("*.tmp")) and not (ckpt / ".megatron-let.lock").exists()

    # A kill in the middle of a later save left a temp directory and metrics past the checkpoint.
    (ckpt / f"iter_{stopped + 1:07d}.tmp").mkdir()
    with open(ckpt / "metrics.jsonl", "a") as fh:
        fh.write(json.dumps({"iteration": stopped + 1, "lm_loss": 0.0}) + "\n" + '{"iteration": ')
    result = torchrun(2, "-m megatron_let.train", "--config", str(cfg))
    assert f"loaded checkpoint {ckpt / f'iter_{stopped:07d}'} at iteration {stopped}" in result.stdout
    assert f"iter_{stopped + 1:07d}.tmp (left by an interrupted save)" in result.stdout
    assert not list(ckpt.glob("*.tmp"))
    resumed = train_records(ckpt / "metrics.jsonl")
    assert [r["iteration"] for r in resumed] == list(range(1, total + 1))

    straight_dir = tmp_path / "straight"
    straight = write_config(
        tmp_path / "straight.yaml", tiny_config(token_data, checkpoint={"save": str(straight_dir)}, **common)
    )
    torchrun(2, "-m megatron_let.train", "--config", str(straight))
    reference = train_records(straight_dir / "metrics.jsonl")
    assert len(reference) == len(resumed) == total
    for a, b in zip(reference, resumed):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-6), a["iteration"]
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9), a["iteration"]


def test_sigterm_to_torchrun_saves_the_current_iteration(tmp_path, token_data):
    """The non-Slurm path: torchrun forwards SIGTERM to its workers, which save and exit 0
    (torchrun itself then reports the signal it got)."""
    ckpt = tmp_path / "ckpt"
    cfg = write_config(
        tmp_path / "run.yaml",
        tiny_config(token_data, training={"train_iters": 100000}, checkpoint={"save": str(ckpt), "save_interval": 3}),
    )
    proc = launch(cfg)
    wait_for_iteration(ckpt / "metrics.jsonl", 5, proc)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=240)
    stopped = int((ckpt / TRACKER).read_text())
    assert f"SIGTERM received: saved at iteration {stopped}, exiting" in output, output[-4000:]
    assert stopped == train_records(ckpt / "metrics.jsonl")[-1]["iteration"] >= 5
    assert (ckpt / f"iter_{stopped:07d}" / ".metadata").exists() and not list(ckpt.glob("*.tmp"))
    assert "ChildFailedError" not in output  # torchrun names a worker that exited non-zero


def test_exit_state_file_says_how_the_run_ended(tmp_path, token_data):
    """What the sbatch script reads to decide about requeueing: interrupted (signal), finished."""
    ckpt = tmp_path / "ckpt"
    state = tmp_path / "job.exit_state"
    cfg = write_config(
        tmp_path / "run.yaml",
        tiny_config(token_data, training={"train_iters": 100000}, checkpoint={"save": str(ckpt), "load": str(ckpt)}),
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MEGATRON_LET_EXIT_STATE": str(state)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "megatron_let.train", "--config", str(cfg)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_iteration(ckpt / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    report = json.loads(state.read_text())
    assert report["status"] == "interrupted" and report["signal"] == "SIGUSR1"
    assert report["iteration"] == int((ckpt / TRACKER).read_text())

    done = report["iteration"] + 1
    result = subprocess.run(
        [sys.executable, "-m", "megatron_let.train", "--config", str(cfg), "--set", f"training.train_iters={done}"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(state.read_text()) == dict(
        report, status="finished", iteration=done, signal=None, train_iters=done
    )


def test_checkpoint_retention_resave_and_fallback(tmp_path, token_data):
    """keep_last keeps the newest N; re-launching a finished run does not rewrite (or delete) its
    checkpoint; a tracker naming a missing checkpoint falls back to the newest complete one."""
    ckpt = tmp_path / "ckpt"
    cfg = write_config(
        tmp_path / "run.yaml",
        tiny_config(
            token_data,
            training={"train_iters": 5},
            checkpoint={"save": str(ckpt), "load": str(ckpt), "save_interval": 1, "keep_last": 2},
        ),
    )
    torchrun(1, "-m megatron_let.train", "--config", str(cfg))
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000004", "iter_0000005"]
    final = ckpt / "iter_0000005"
    stamp = (final / ".metadata").stat().st_mtime_ns

    again = torchrun(1, "-m megatron_let.train", "--config", str(cfg))
    assert "loaded checkpoint" in again.stdout and "saved checkpoint" not in again.stdout
    assert (final / ".metadata").stat().st_mtime_ns == stamp
    assert len(read_jsonl(ckpt / "metrics.jsonl")) == 5  # the relaunch added no record

    # A kill while iteration 5 was being replaced: the tracker names it, its directory is gone.
    os.rename(final, ckpt / "iter_0000005.deleting")
    resumed = torchrun(1, "-m megatron_let.train", "--config", str(cfg), "--set", "training.train_iters=6")
    assert "names iteration 5, whose checkpoint is missing or incomplete" in resumed.stderr
    assert f"loaded checkpoint {ckpt / 'iter_0000004'} at iteration 4" in resumed.stdout
    assert sorted(p.name for p in ckpt.glob("iter_*")) == ["iter_0000005", "iter_0000006"]
    assert [r["iteration"] for r in train_records(ckpt / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_a_second_run_on_the_same_checkpoint_directory_is_refused(tmp_path, token_data):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        import socket

        (ckpt / ".megatron-let.lock").write_text(
            json.dumps({"job_id": None, "host": socket.gethostname(), "pid": holder.pid, "since": 0})
        )
        cfg = write_config(tmp_path / "run.yaml", tiny_config(token_data, checkpoint={"save": str(ckpt)}))
        result = subprocess.run(
            [sys.executable, "-m", "megatron_let.train", "--config", str(cfg)],
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            capture_output=True,
            text=True,
            timeout=240,
        )
        assert result.returncode != 0
        assert f"process {holder.pid} on {socket.gethostname()} is writing checkpoints" in result.stderr
        assert not list(ckpt.glob("iter_*"))
    finally:
        holder.kill()
        holder.wait()
    # The holder is gone: the lock is stale and taken over.
    result = subprocess.run(
        [sys.executable, "-m", "megatron_let.train", "--config", str(cfg)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "taking over a stale lock" in result.stderr
    assert not (ckpt / ".megatron-let.lock").exists()


def test_lr_logged_is_the_lr_used_and_warmup_starts_above_zero(tmp_path, token_data):
    """Iteration i trains at schedule(i): linear warm-up from lr/w at iteration 1 to lr at w, then
    cosine to min_lr at train_iters (computed here from the formula, not from megatron)."""
    iters, lr, warmup_fraction = 10, 1e-3, 0.3
    cfg = write_config(
        tmp_path / "run.yaml",
        tiny_config(
            token_data,
            training={"train_iters": iters},
            checkpoint={"save": str(tmp_path / "c")},
            optimizer={"lr": lr, "min_lr": 1e-4, "lr_warmup_fraction": warmup_fraction},
        ),
    )
    torchrun(1, "-m megatron_let.train", "--config", str(cfg))
    logged = [r["lr"] for r in train_records(tmp_path / "c" / "metrics.jsonl")]
    warmup = 3

    def schedule(i):
        if i <= warmup:
            return lr * i / warmup
        ratio = (i - warmup) / (iters - warmup)
        return 1e-4 + (lr - 1e-4) * 0.5 * (math.cos(math.pi * ratio) + 1)

    assert logged == pytest.approx([schedule(i) for i in range(1, iters + 1)], rel=1e-9)
    assert logged[0] > 0 and logged[-1] == pytest.approx(1e-4)


def test_a_signal_during_start_up_stops_cleanly(tmp_path, token_data):
    """Slurm's time-limit warning can land while the processes still import megatron: the run
    exits 0 reporting 'interrupted' (so the job requeues) instead of dying on the signal."""
    state = tmp_path / "job.exit_state"
    cfg = write_config(tmp_path / "run.yaml", tiny_config(token_data, checkpoint={"save": str(tmp_path / "c")}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "MEGATRON_LET_EXIT_STATE": str(state)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "megatron_let.train", "--config", str(cfg)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    time.sleep(1.0)  # inside `import torch` / megatron
    proc.send_signal(signal.SIGUSR1)
    output, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, output[-3000:]
    assert "SIGUSR1 received during start-up: exiting" in output
    assert json.loads(state.read_text())["status"] == "interrupted"
    assert not (tmp_path / "c" / TRACKER).exists()


def test_exit_duration_saves_and_reports_interrupted(tmp_path, token_data):
    """Megatron-LM's --exit-duration-in-mins: past the budget, save after the step and stop as for
    a signal (the sbatch script requeues)."""
    state = tmp_path / "job.exit_state"
    ckpt = tmp_path / "c"
    cfg = write_config(
        tmp_path / "run.yaml",
        tiny_config(
            token_data, training={"train_iters": 1000, "exit_duration_in_mins": 1e-4}, checkpoint={"save": str(ckpt)}
        ),
    )
    result = torchrun(1, "-m megatron_let.train", "--config", str(cfg), env={"MEGATRON_LET_EXIT_STATE": str(state)})
    assert "exit_duration_in_mins reached: saved at iteration 1, exiting" in result.stdout
    assert json.loads(state.read_text())["status"] == "interrupted"
    assert (ckpt / TRACKER).read_text().strip() == "1"


def test_tensorboard_has_each_iteration_once_after_a_restart(tmp_path, token_data):
    """Iterations 4-5 ran, were logged, and were lost to a kill before any save: the restart from
    iteration 3 logs them again, and TensorBoard shows each step once (the restart's values)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ckpt, board = tmp_path / "ckpt", tmp_path / "tb"
    cfg = write_config(
        tmp_path / "run.yaml",
        tiny_config(
            token_data,
            training={"train_iters": 6},
            logging={"log_interval": 1, "tensorboard_dir": str(board)},
            checkpoint={"save": str(ckpt), "load": str(ckpt), "save_interval": 3},
        ),
    )
    # The first launch: 5 iterations, then "killed" (its checkpoint at 5 removed, as if never written).
    torchrun(1, "-m megatron_let.train", "--config", str(cfg), "--set", "training.exit_interval=5")
    os.rename(ckpt / "iter_0000005", ckpt / "iter_0000005.deleting")
    (ckpt / TRACKER).write_text("3\n")
    torchrun(1, "-m megatron_let.train", "--config", str(cfg))
    events = EventAccumulator(str(board))
    events.Reload()
    steps = [event.step for event in events.Scalars("train/lm_loss")]
    assert steps == [1, 2, 3, 4, 5, 6]
    jsonl = {r["iteration"]: r["lm_loss"] for r in train_records(ckpt / "metrics.jsonl")}
    assert [event.value for event in events.Scalars("train/lm_loss")] == pytest.approx(
        [jsonl[i] for i in steps], rel=1e-6
    )
