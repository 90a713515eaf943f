"""The project's own sbatch script on a real Slurm (tests/slurm/cluster.sh), as a cluster treats
a job: it completes; `scontrol requeue` after a periodic save; a time limit reached mid-run;
`scancel --signal=TERM`. 2 tasks, gloo, PP 2, a save every 20 iterations. The four jobs run side by
side (about 3-4 minutes in all); the uninterrupted job's losses are the reference for the others.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from conftest import REPO, tiny_config, write_config

SCRIPT = REPO / "slurm" / "pretrain_let.sbatch"
TRAIN_ITERS = 100
# More than one 1-minute run can train (at most ~8 iterations/s on 2 cores, ~30 s before the
# warning), with HLDC's slower steps: several runs.
LIMITED_ITERS = 400
CPU_TASKS = ["--ntasks-per-node=2", "--cpus-per-task=1", "--gpus-per-node=0"]


def records(ckpt):
    path = ckpt / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip() and "split" not in line]


def saved(ckpt):
    tracker = ckpt / "latest_checkpointed_iteration.txt"
    return int(tracker.read_text()) if tracker.exists() else None


class Job:
    def __init__(
        self,
        cluster,
        tmp_path,
        data,
        name,
        sbatch_args=(),
        submit_with_cli=False,
        train_iters=TRAIN_ITERS,
        export="",
        method="let",
    ):
        self.cluster, self.name = cluster, name
        self.ckpt = tmp_path / name / "ckpt"
        self.logs = tmp_path / name / "logs"
        cfg = tiny_config(
            data,
            method=method,
            training={"train_iters": train_iters},
            parallel={"pipeline_model_parallel_size": 2},
            alignment={"stop_step": 50},
            checkpoint={"save": str(self.ckpt), "load": str(self.ckpt), "save_interval": 20},
        )
        self.config = write_config(tmp_path / f"{name}.yaml", cfg)
        env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        if submit_with_cli:  # megatron-let submit: checks, creates the log directory, runs sbatch
            result = cluster.run(
                "python",
                "-m",
                "megatron_let.cli",
                "submit",
                "--config",
                str(self.config),
                "--nodes",
                "1",
                "--ntasks-per-node",
                "2",
                "--gpus-per-node",
                "0",
                "--time",
                "10",
                "--log-dir",
                str(self.logs),
                "--",
                "--cpus-per-task=1",
                "--parsable",
                cwd=REPO,
                env={**cluster.env, **env},
                timeout=120,
            )
            self.id = result.stdout.strip().splitlines()[-1].split(";")[0]
            assert "running: sbatch --nodes=1" in result.stdout
        else:
            self.logs.mkdir(parents=True)
            self.id = cluster.sbatch(
                [
                    *CPU_TASKS,
                    "--time=10",
                    f"--output={self.logs}/%x-%j.out",
                    f"--export=ALL,MEGATRON_LET_LOG_DIR={self.logs}{export}",
                    *sbatch_args,
                    SCRIPT,
                    self.config,
                ],
                cwd=REPO,
                env=env,
            )

    @property
    def log(self):
        files = list(self.logs.glob("*.out"))
        return files[0].read_text() if files else ""

    def wait_for(self, condition, what, timeout=300):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if condition():
                return
            time.sleep(0.3)
        raise AssertionError(
            f"job {self.name} ({self.id}): no {what} after {timeout}s; state "
            f"{self.cluster.job_state(self.id)}\n{self.log[-4000:]}"
        )

    def iteration(self):
        found = records(self.ckpt)
        return found[-1]["iteration"] if found else 0


def assert_same_curve(job, reference):
    got, want = records(job.ckpt), records(reference.ckpt)
    assert [r["iteration"] for r in got] == list(range(1, TRAIN_ITERS + 1)), job.name  # each once
    for a, b in zip(want, got):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-6), (job.name, a["iteration"])
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9), (job.name, a["iteration"])


def test_sbatch_jobs_survive_what_clusters_do(slurm_cluster, tmp_path, token_data):
    cluster = slurm_cluster
    # (c) first: its 1-minute limit is the longest wait. Warned 30 s ahead (Slurm checks limits
    # every 30 s, so the warning may come up to 30 s early); each run trains for a while, saves on
    # the warning, requeues itself and resumes until train_iters.
    # More work than one 1-minute run can do on any machine (2 cores train ~8 iterations/s at best),
    # so the limit is reached at least once; its curve is checked for continuity, the other
    # interrupted jobs' against the uninterrupted one.
    # While the four jobs share 2 cores, a run's start-up can outlast its warning several times in
    # a row (it then ends where it began): allow more such runs than the script's default 3.
    limited = Job(
        cluster,
        tmp_path,
        token_data,
        "time_limit",
        ["--time=1", "--signal=B:USR1@30"],
        train_iters=LIMITED_ITERS,
        export=",MEGATRON_LET_MAX_STALLED_RUNS=12",
        method="hldc",  # another objective through the same script: the teacher on both stages, W_R checkpointed
    )
    complete = Job(cluster, tmp_path, token_data, "complete", submit_with_cli=True)
    requeued = Job(cluster, tmp_path, token_data, "requeue")
    signalled = Job(cluster, tmp_path, token_data, "scancel_term")
    summary = {}

    # (b) `scontrol requeue` after a periodic save, and (d) `scancel --signal=TERM` (the training
    # tasks get it, save the current iteration, exit 0, and the script requeues the job: it stopped
    # before train_iters), each as soon as its job is past its first periodic save.
    actions = {requeued: ["scontrol", "requeue"], signalled: ["scancel", "--signal=TERM"]}
    interrupted_after = {}
    deadline = time.monotonic() + 300
    while len(interrupted_after) < len(actions):
        assert time.monotonic() < deadline, {job.name: job.log[-3000:] for job in actions}
        for job, command in actions.items():
            if job not in interrupted_after and (saved(job.ckpt) or 0) >= 20 and job.iteration() >= 25:
                cluster.run(*command, job.id)
                interrupted_after[job] = job.iteration()
        time.sleep(0.2)
    for job in actions:
        job.wait_for(lambda: "run 1 on" in job.log, "second run")  # noqa: B023 (called at once)
        stopped_at = int(re.search(r"SIGTERM received: saved at iteration (\d+)", job.log).group(1))
        # Not back to the periodic save: at most the step in flight when the signal came is lost.
        assert stopped_at >= interrupted_after[job], job.name
        assert (job.ckpt / f"iter_{stopped_at:07d}" / ".metadata").exists()
        job.wait_for(
            lambda: f"loaded checkpoint {job.ckpt / f'iter_{stopped_at:07d}'}" in job.log,  # noqa: B023
            "resume",
        )
        summary[job.name] = dict(interrupted_after=interrupted_after[job], saved_at=stopped_at)
    assert "requeueing job" in signalled.log  # the script's own requeue (Slurm's own for `scontrol requeue`)

    for job in (complete, requeued, signalled, limited):
        assert cluster.wait(job.id, timeout=600) == "COMPLETED", (job.name, job.log[-4000:])
        history = cluster.state_history(job.id)
        summary[job.name] = dict(summary.get(job.name, {}), **history)
        assert json.loads((job.logs / f"{job.id}.exit_state").read_text())["status"] == "finished"
        assert not (job.ckpt / ".megatron-let.lock").exists()
    assert summary["complete"]["states"] == ["COMPLETED"] and summary["complete"]["restarts"] == 0
    for name in ("requeue", "scancel_term", "time_limit"):
        # jobcomp logs each requeued run as PENDING. Slurm does not always repeat the --signal warning
        # after a requeue; a run then reaches the hard limit (TIMEOUT): its tasks save on the limit's
        # SIGTERM within KillWait and the script still requeues the job.
        states = summary[name]["states"]
        between = {"PENDING", "TIMEOUT"} if name == "time_limit" else {"PENDING"}
        assert summary[name]["restarts"] >= 1 and set(states[:-1]) <= between and states[-1] == "COMPLETED", name
    assert "SIGUSR1 received by the batch script" in limited.log and "hldc: (1 − 0.5)·NLL" in limited.log
    for job in (requeued, signalled):
        assert_same_curve(job, complete)
    assert [r["iteration"] for r in records(limited.ckpt)] == list(range(1, LIMITED_ITERS + 1))  # each once
    print("\nSlurm scenarios:", json.dumps(summary, indent=1))


from test_preprocess import SP_VOCAB, corpus_dir, sp_model  # noqa: E402,F401  (fixtures: a real corpus, a tokenizer)


def test_preprocess_and_export_sbatch_scripts(slurm_cluster, tmp_path, corpus_dir, sp_model):  # noqa: F811
    """slurm/preprocess.sbatch on 2 CPUs (workers from the allocation, tokenizer flags passed
    through) writes what tools/preprocess_data.py writes; the data trains a run whose checkpoint
    slurm/export_hf.sbatch turns into a group-readable Hugging Face directory that transformers
    loads, and scores one downstream task."""
    cluster = slurm_cluster
    logs = tmp_path / "logs"
    logs.mkdir()
    env = {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    tokenizer = ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model]
    job = cluster.sbatch(
        [
            "--cpus-per-task=2",
            f"--output={logs}/%x-%j.out",
            REPO / "slurm" / "preprocess.sbatch",
            str(corpus_dir / "*.jsonl"),
            tmp_path / "data" / "corpus",
            *tokenizer,
        ],
        cwd=REPO,
        env=env,
    )
    state = cluster.wait(job, timeout=300)
    log = next(logs.glob("*preprocess*.out")).read_text()
    assert state == "COMPLETED", log[-3000:]
    direct = subprocess.run(
        [
            sys.executable,
            "tools/preprocess_data.py",
            "--input",
            str(corpus_dir / "*.jsonl"),
            "--output-prefix",
            str(tmp_path / "direct"),
            "--append-eod",
            "--workers",
            "1",
            *tokenizer,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert direct.returncode == 0, direct.stderr
    for suffix in (".bin", ".idx"):
        assert (tmp_path / "data" / f"corpus_text_document{suffix}").read_bytes() == (
            tmp_path / f"direct_text_document{suffix}"
        ).read_bytes()
    assert "workers 2" in log or "2 workers" in log, log[-2000:]

    # Without a tokenizer: refused with the flag named, nothing written.
    bad = cluster.sbatch(
        [
            "--cpus-per-task=1",
            f"--output={logs}/%x-%j.bad",
            REPO / "slurm" / "preprocess.sbatch",
            str(corpus_dir / "*.jsonl"),
            tmp_path / "nothing" / "corpus",
        ],
        cwd=REPO,
        env=env,
    )
    assert cluster.wait(bad, timeout=120) == "FAILED"
    assert "--tokenizer-type" in next(logs.glob("*.bad")).read_text()
    assert not (tmp_path / "nothing").exists()

    vocab = SP_VOCAB
    ckpt = tmp_path / "ckpt"
    cfg = write_config(
        tmp_path / "run.yaml",
        tiny_config(
            tmp_path / "data" / "corpus_text_document",
            teacher=None,
            training={"train_iters": 3},
            model={"vocab_size": vocab},
            data={"eod_token_id": None},
            checkpoint={"save": str(ckpt)},
        ),
    )
    torchrun = subprocess.run(
        [sys.executable, "-m", "megatron_let.train", "--config", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=300,
    )
    assert torchrun.returncode == 0, torchrun.stderr[-3000:]
    hf_dir = tmp_path / "hf"
    tokenizer_dir = tmp_path / "tokenizer"  # the SentencePiece model as a Hugging Face Llama tokenizer
    tokenizer_dir.mkdir()
    shutil.copyfile(sp_model, tokenizer_dir / "tokenizer.model")
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "LlamaTokenizer"}))
    job = cluster.sbatch(
        [
            "--gpus-per-node=0",
            "--cpus-per-task=2",
            f"--output={logs}/%x-%j.out",
            REPO / "slurm" / "export_hf.sbatch",
            ckpt,
            hf_dir,
            tokenizer_dir,
        ],
        cwd=REPO,
        env={
            **env,
            "EVAL_DEVICE": "cpu",
            "EVAL_BATCH_SIZE": "8",
            "EVAL_ARGS": "--tasks arc_easy --limit 2",
            "HF_HUB_OFFLINE": "1",
        },
    )
    state = cluster.wait(job, timeout=600)
    log = next(logs.glob("*export*.out")).read_text()
    assert state == "COMPLETED", log[-4000:]
    for path in hf_dir.iterdir():
        assert path.stat().st_mode & 0o044 == 0o044, f"{path.name} is not group/world-readable"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(hf_dir)
    assert model.config.vocab_size >= vocab and model.config.num_hidden_layers == 4
    assert json.loads((hf_dir / "downstream.json").read_text())["tasks"]["arc_easy"]["n"] == 2


def test_a_study_as_a_slurm_job_array(slurm_cluster, tmp_path, token_data):
    """`megatron-let study --emit-sbatch`: the runs as a job array (one task per run, each
    `--only INDEX`), the report as a job after it (afterok); the report holds every method."""
    cluster = slurm_cluster
    write_config(tmp_path / "base.yaml", tiny_config(token_data, distillation={"top_k": 16}))
    spec = {
        "work_dir": str(tmp_path / "work"),
        "config": "base.yaml",
        "budget": {"steps": 2},
        "methods": ["nll", "kd"],
        "grid": {"optimizer.lr": [1e-3]},
        "reference": "kd",
        "eval": {"interval": 1, "iters": 1},
    }
    write_config(tmp_path / "study.yaml", spec)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    emitted = subprocess.run(
        [sys.executable, "-m", "megatron_let.cli", "study", "--config", "study.yaml", "--emit-sbatch", "sbatch"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
    )
    assert emitted.returncode == 0, emitted.stderr
    assert not (tmp_path / "work" / "runs").exists()  # nothing trained yet
    array = cluster.sbatch([tmp_path / "sbatch" / "study_runs.sbatch"], cwd=tmp_path, env=env)
    report = cluster.sbatch(
        [f"--dependency=afterok:{array}", tmp_path / "sbatch" / "study_report.sbatch"], cwd=tmp_path, env=env
    )
    state = cluster.wait(report, timeout=400)
    logs = "\n".join(p.read_text()[-2000:] for p in sorted((tmp_path / "work" / "slurm").glob("*.out")))
    assert state == "COMPLETED", logs
    summary = json.loads((tmp_path / "work" / "report" / "summary.json").read_text())
    assert sorted(summary["best"]) == ["kd", "nll"]
    assert len(list((tmp_path / "work" / "slurm").glob("*_[01].out"))) == 2  # one log per array task
