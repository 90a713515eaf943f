"""A real single-node Slurm cluster for tests (tests/slurm/cluster.sh), driven from pytest.

    cluster = SlurmCluster().start(tmp_path_factory.mktemp("slurm"))   # pytest.skip if Slurm can't run
    job = cluster.sbatch(["job.sh"], cwd=tmp_path)
    assert cluster.wait(job) == "COMPLETED"
    cluster.stop()

No accounting daemon runs, so there is no sacct: a job's state comes from `scontrol show job` while
slurmctld still knows the job (MinJobAge=300 s after it ends), and from jobcomp/filetxt's log, which
gets one line per finished run (a run ended by a requeue is logged as JobState=PENDING).
Set LET_REQUIRE_SLURM=1 to make a cluster that cannot start fail the test instead of skipping it.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

CLUSTER_SH = Path(__file__).resolve().parent / "slurm" / "cluster.sh"

# Job states after which a job (or one of its runs) no longer changes by itself.
FINAL_STATES = frozenset(
    {
        "COMPLETED",
        "FAILED",
        "CANCELLED",
        "TIMEOUT",
        "NODE_FAIL",
        "PREEMPTED",
        "BOOT_FAIL",
        "DEADLINE",
        "OUT_OF_MEMORY",
        "SPECIAL_EXIT",
        "REVOKED",
    }
)

_KEY = re.compile(r"(?:^|\s)([A-Za-z][\w:/]*)=")  # keys like JobState, AllocNode:Sid, CPUs/Task


def parse_key_values(line: str) -> dict[str, str]:
    """`A=1 B=x y C=2` (one line of `scontrol show -o` or of jobcomp.log) -> {'A': '1', 'B': 'x y', 'C': '2'}."""
    keys = list(_KEY.finditer(line))
    out = {}
    for i, m in enumerate(keys):
        end = keys[i + 1].start() if i + 1 < len(keys) else len(line)
        out[m.group(1)] = line[m.end() : end].strip()
    return out


class SlurmCluster:
    """slurmctld + slurmd + munged on localhost, with state, logs and jobcomp.log under one directory."""

    def __init__(self) -> None:
        self.state_dir: Path | None = None

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, state_dir) -> "SlurmCluster":
        """Start (or reuse) the cluster in ``state_dir``; pytest.skip with cluster.sh's reason if it can't."""
        self.state_dir = Path(state_dir).resolve()
        result = subprocess.run(
            ["bash", str(CLUSTER_SH), "start", str(self.state_dir)], capture_output=True, text=True, timeout=900
        )
        if result.returncode != 0:
            output = (result.stderr + result.stdout).strip()
            said = [line for line in output.splitlines() if line.startswith("cluster.sh:")]
            reason = (
                f"Slurm test cluster unavailable (cluster.sh rc={result.returncode}): "
                f"{said[-1] if said else output[-500:]} [logs under {self.state_dir}]"
            )
            self.stop()  # whatever did start (munged, slurmctld)
            if os.environ.get("LET_REQUIRE_SLURM"):
                pytest.fail(f"{reason}\n{output[-4000:]}")
            pytest.skip(reason)
        return self

    def stop(self) -> None:
        """Cancel leftover jobs and stop the daemons."""
        if self.state_dir is not None:
            subprocess.run(
                ["bash", str(CLUSTER_SH), "stop", str(self.state_dir)], capture_output=True, text=True, timeout=120
            )

    # -- paths and environment ---------------------------------------------------------------------
    @property
    def slurm_conf(self) -> Path:
        return self.state_dir / "slurm.conf"

    @property
    def jobcomp_log(self) -> Path:
        return self.state_dir / "jobcomp.log"

    @property
    def log_dir(self) -> Path:
        """slurmctld.log and slurmd.log."""
        return self.state_dir / "log"

    @property
    def env(self) -> dict[str, str]:
        """os.environ with SLURM_CONF pointing at this cluster, minus any SLURM_*/SBATCH_*/SRUN_*
        variables inherited from an enclosing job (they would leak into sbatch/srun)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))}
        env["SLURM_CONF"] = str(self.slurm_conf)
        return env

    def run(self, *cmd: str, check: bool = True, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
        """Run a Slurm client (``cluster.run("squeue", "-h")``) against this cluster."""
        kw.setdefault("env", self.env)
        result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, **kw)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}): {result.stderr.strip()}")
        return result

    # -- jobs --------------------------------------------------------------------------------------
    def sbatch(self, args, cwd=None, env=None) -> str:
        """``sbatch --parsable *args``; returns the job id. ``env`` entries are added to :attr:`env`."""
        full_env = {**self.env, **(env or {})}
        out = self.run("sbatch", "--parsable", *map(str, args), cwd=cwd, env=full_env).stdout.strip()
        return out.splitlines()[-1].split(";")[0]

    def job_info(self, job_id) -> dict[str, str] | None:
        """``scontrol show job -o`` as a dict, or None once slurmctld has forgotten the job."""
        result = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        if result.returncode != 0 or "JobId=" not in result.stdout:
            return None
        return parse_key_values(result.stdout.strip().splitlines()[0])

    def job_state(self, job_id) -> str | None:
        """Current JobState (e.g. PENDING, RUNNING, COMPLETING, COMPLETED, TIMEOUT); falls back to the
        last jobcomp.log record once the job is purged from slurmctld; None if never seen."""
        info = self.job_info(job_id)
        if info is not None:
            return info.get("JobState")
        records = self.jobcomp_records(job_id)
        return records[-1].get("JobState") if records else None

    def wait(self, job_id, states=FINAL_STATES, timeout: float = 120, poll: float = 0.5) -> str:
        """Poll until the job's state is in ``states``; return it. TimeoutError with the job's info if not."""
        states = {states} if isinstance(states, str) else set(states)
        deadline = time.monotonic() + timeout
        while True:
            state = self.job_state(job_id)
            if state in states:
                return state
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"job {job_id} still {state} after {timeout}s (waited for {sorted(states)}): "
                    f"{self.job_info(job_id)}"
                )
            time.sleep(poll)

    def jobcomp_records(self, job_id=None) -> list[dict[str, str]]:
        """jobcomp/filetxt's records (one per finished run), optionally only those of ``job_id``."""
        if not self.jobcomp_log.exists():
            return []
        records = [parse_key_values(line) for line in self.jobcomp_log.read_text().splitlines() if line.strip()]
        return [r for r in records if job_id is None or r.get("JobId") == str(job_id)]

    def state_history(self, job_id) -> dict:
        """{'states': JobState of each finished run as jobcomp logged it (a requeued run shows as
        PENDING), 'restarts': scontrol's Restarts= (None once the job is purged)}."""
        info = self.job_info(job_id)
        return {
            "states": [r.get("JobState") for r in self.jobcomp_records(job_id)],
            "restarts": int(info["Restarts"]) if info and "Restarts" in info else None,
        }

    def requeue(self, job_id, release: bool = True) -> None:
        """``scontrol requeue``. A requeued job is held for cred_expire+1 s (11 s here) before it may
        start again; ``release`` waits until it is pending and lifts that (see release_begin_time)."""
        self.run("scontrol", "requeue", str(job_id))
        if release:
            self.release_begin_time(job_id)

    def release_begin_time(self, job_id, timeout: float = 60) -> None:
        """Once the job is PENDING (after its previous run has finished completing), set StartTime=now
        so it starts at the next scheduling pass instead of after the requeue hold-off."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job_info(job_id) or {}
            if info.get("JobState") == "PENDING":
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
                return
            if info.get("JobState") in FINAL_STATES:
                return
            time.sleep(0.2)
        raise TimeoutError(f"job {job_id} did not become PENDING within {timeout}s: {self.job_info(job_id)}")

    def scancel(self, job_id, signal: str | None = None, full: bool = False, batch: bool = False) -> None:
        """``scancel [--signal=SIG] [--full|--batch] JOB``. With a signal and neither flag, only the job's
        steps (srun tasks) get it, not the batch shell; --batch: only the batch shell; --full: both."""
        cmd = ["scancel"]
        if signal:
            cmd.append(f"--signal={signal}")
        if full:
            cmd.append("--full")
        if batch:
            cmd.append("--batch")
        self.run(*cmd, str(job_id))
