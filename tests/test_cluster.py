"""The scheduler glue without a scheduler: Slurm host lists and environment, device choice, the
run lock, and `megatron-let submit`'s checks (a dry run: nothing is submitted)."""

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys

import pytest

from megatron_let.platform import cluster

from conftest import REPO, tiny_config, write_config


@pytest.mark.parametrize(
    "hostlist, hosts",
    [
        ("node1", ["node1"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("a[8-11],b5", ["a8", "a9", "a10", "a11", "b5"]),
        ("rack1-n[009-011]-ib", ["rack1-n009", "rack1-n010", "rack1-n011"]),
        ("x[1,3],y[2-3]", ["x1", "x3", "y2", "y3"]),
    ],
)
def test_expand_hostlist(hostlist, hosts):
    got = cluster.expand_hostlist(hostlist)
    if "-ib" in hostlist:
        hosts = [h + "-ib" for h in hosts]
    assert got == hosts
    if shutil.which("scontrol"):  # Slurm's own expansion, where installed
        out = subprocess.run(["scontrol", "show", "hostnames", hostlist], capture_output=True, text=True)
        if out.returncode == 0:
            assert out.stdout.split() == got


def test_env_from_slurm_derives_ranks_and_rendezvous():
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_ID": "123456",
        "SLURM_JOB_NODELIST": "gpu[07-08]",
    }
    added = cluster.env_from_slurm(env)
    assert added == {
        "RANK": "5",
        "WORLD_SIZE": "16",
        "LOCAL_RANK": "1",
        "MASTER_ADDR": "gpu07",
        "MASTER_PORT": str(20000 + 123456 % 20000),
    }
    # torchrun (or the sbatch script) already set them: nothing is overridden.
    assert cluster.env_from_slurm({"SLURM_PROCID": "0", "RANK": "3"}) == {}
    explicit = {"SLURM_PROCID": "0", "SLURM_JOB_ID": "9", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    cluster.env_from_slurm(explicit)
    assert (explicit["MASTER_ADDR"], explicit["MASTER_PORT"]) == ("h", "1")


def test_device_index_follows_visible_devices():
    assert [cluster.local_device_index(r, 8) for r in range(8)] == list(range(8))
    # --gpus-per-task=1 / --gpu-bind: each task sees one GPU.
    assert [cluster.local_device_index(r, 1) for r in range(8)] == [0] * 8
    assert [cluster.local_device_index(r, 4) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    with pytest.raises(RuntimeError, match="sees no GPU"):
        cluster.local_device_index(0, 0)


def test_run_lock(tmp_path, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    lock = cluster.RunLock(tmp_path)
    lock.acquire()
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    other = cluster.RunLock(tmp_path)
    other.me = dict(other.me, pid=os.getpid() + 1)
    # A live process on this host holds it (this one).
    with pytest.raises(cluster.LockHeld, match=f"process {os.getpid()} on {socket.gethostname()}"):
        other.acquire()
    other.release()  # not the holder: nothing removed
    assert lock.path.exists()
    lock.release()
    assert not lock.path.exists()

    # A dead holder is stale; the same Slurm job (requeued) takes its own lock over.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.path.write_text(json.dumps({"job_id": None, "host": socket.gethostname(), "pid": dead.pid}))
    cluster.RunLock(tmp_path).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    lock.path.write_text(json.dumps({"job_id": "77", "host": "elsewhere", "pid": 1}))
    requeued = cluster.RunLock(tmp_path)
    requeued.acquire()
    assert json.loads(lock.path.read_text())["job_id"] == "77"
    # Another job on another host, with no Slurm to ask: refused, naming it.
    lock.path.write_text(json.dumps({"job_id": "78", "host": "elsewhere", "pid": 1}))
    if cluster.slurm_job_alive("78") is None:
        with pytest.raises(cluster.LockHeld, match="Slurm job 78 on elsewhere"):
            cluster.RunLock(tmp_path).acquire()


def submit(*args, cwd=REPO):
    return subprocess.run(
        [sys.executable, "-m", "megatron_let.cli", "submit", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=120,
    )


def test_submit_dry_run_checks_and_prints_the_sbatch_command(tmp_path, token_data):
    ckpt = tmp_path / "ckpt"
    cfg = write_config(
        tmp_path / "run.yaml",
        tiny_config(
            token_data, parallel={"pipeline_model_parallel_size": 2}, checkpoint={"save": str(ckpt), "load": str(ckpt)}
        ),
    )
    logs = tmp_path / "logs"
    result = submit(
        "--config",
        str(cfg),
        "--nodes",
        "1",
        "--ntasks-per-node",
        "2",
        "--time",
        "00:10:00",
        "--log-dir",
        str(logs),
        "--set",
        "training.train_iters=7",
        "--dry-run",
        "--",
        "--qos=low",
    )
    assert result.returncode == 0, result.stderr
    assert logs.is_dir()
    line = next(out for out in result.stdout.splitlines() if out.startswith("would run: "))
    command = shlex.split(line[len("would run: ") :])
    assert command[:2] == ["sbatch", "--nodes=1"]
    assert f"--output={logs}/%x-%j.out" in command and "--time=00:10:00" in command and "--qos=low" in command
    assert command[-4:] == [str(REPO / "slurm" / "pretrain_let.sbatch"), str(cfg), "--set", "training.train_iters=7"]
    assert "documents" in result.stdout  # the data was opened


@pytest.mark.parametrize(
    "change, flags, message",
    [
        (
            {"data": {"data_path": ["/nonexistent/corpus"]}},
            [],
            "data.data_path: /nonexistent/corpus.bin does not exist",
        ),
        (
            {},
            ["--ntasks-per-node", "3"],
            "3 tasks cannot hold tensor_model_parallel_size × pipeline_model_parallel_size = 2",
        ),
        ({"model": {"num_layers": 3}}, [], "parallel.pipeline_model_parallel_size"),
    ],
)
def test_submit_refuses_bad_runs_before_queueing(tmp_path, token_data, change, flags, message):
    cfg = tiny_config(token_data, parallel={"pipeline_model_parallel_size": 2})
    for section, values in change.items():
        cfg[section].update(values)
    path = write_config(tmp_path / "bad.yaml", cfg)
    result = submit("--config", str(path), "--ntasks-per-node", "2", "--dry-run", *(flags or []))
    assert result.returncode == 2
    assert message in result.stderr and "would run" not in result.stdout


def test_submit_refuses_a_directory_another_live_job_writes(tmp_path, token_data, monkeypatch):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / ".megatron-let.lock").write_text(json.dumps({"job_id": "4242", "host": "n1", "pid": 1}))
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    # squeue answering that job 4242 runs: the check must ask the scheduler, not guess.
    (fake_bin / "squeue").write_text("#!/bin/sh\necho RUNNING\n")
    (fake_bin / "squeue").chmod(0o755)
    cfg = write_config(
        tmp_path / "run.yaml", tiny_config(token_data, checkpoint={"save": str(ckpt), "load": str(ckpt)})
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "megatron_let.cli",
            "submit",
            "--config",
            str(cfg),
            "--ntasks-per-node",
            "1",
            "--dry-run",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO), "PATH": f"{fake_bin}:{os.environ['PATH']}"},
    )
    assert result.returncode == 2
    assert "being written by Slurm job 4242" in result.stderr


def test_a_signal_after_the_run_ended_is_ignored():
    """After the last save and report, a late exit signal (Slurm's warning racing the end of
    training) must neither kill the process nor count: Python restores default dispositions at
    shutdown, which would turn a finished run into one killed by SIGUSR1."""
    code = (
        "import os, signal\nfrom megatron_let.platform import signals\nsignals.listen(['SIGTERM', 'SIGUSR1'])\n"
        "signals.ignore_from_now_on()\nos.kill(os.getpid(), signal.SIGUSR1)\nos.kill(os.getpid(), signal.SIGTERM)\n"
        "print('alive', signals.received())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout.strip() == "alive None", result.stderr
