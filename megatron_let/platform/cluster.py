"""The scheduler around a run: ranks and rendezvous from Slurm, job identity, and the lock that
keeps two jobs from writing one checkpoint directory.

Nothing here imports megatron or torch: the sbatch scripts and ``megatron-let submit`` use it
before any process group exists.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

from megatron_let.platform.files import write_text_atomic

logger = logging.getLogger(__name__)

LOCK_NAME = ".megatron-let.lock"


# ------------------------------------------------------------------------------- Slurm environment


def expand_hostlist(hostlist: str) -> list[str]:
    """Slurm's compressed host list → host names: ``gpu[01-03,07],login1`` → gpu01 gpu02 gpu03 gpu07 login1
    (what ``scontrol show hostnames`` prints, without needing scontrol on the compute node)."""
    hosts: list[str] = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\])?[^,]*", hostlist):
        match = re.fullmatch(r"([^\[]*)\[([^\]]*)\](.*)", item)
        if not match:
            hosts.append(item)
            continue
        prefix, ranges, suffix = match.groups()
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            if not high:
                hosts.append(f"{prefix}{low}{suffix}")
                continue
            width = len(low)
            hosts += [f"{prefix}{n:0{width}d}{suffix}" for n in range(int(low), int(high) + 1)]
    return hosts


def rendezvous_port(job_id: str) -> int:
    """A port every task of a job derives alike, different for jobs sharing a node."""
    return 20000 + int(re.sub(r"\D", "", job_id) or 0) % 20000


def env_from_slurm(environ=os.environ) -> dict:
    """Under ``srun`` without torchrun (one task per GPU), the variables torch.distributed needs,
    taken from Slurm as Megatron-LM does: ranks from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID,
    the rendezvous host from the step's first node and a port from the job id. Variables that are
    already set (torchrun, or the sbatch script's exports) win. Returns what was added."""
    if "SLURM_PROCID" not in environ or "RANK" in environ:
        return {}
    added = {
        "RANK": environ["SLURM_PROCID"],
        "WORLD_SIZE": environ.get("SLURM_NTASKS") or environ.get("SLURM_NPROCS") or "1",
        "LOCAL_RANK": environ.get("SLURM_LOCALID", "0"),
    }
    nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST")
    if "MASTER_ADDR" not in environ and nodelist:
        added["MASTER_ADDR"] = expand_hostlist(nodelist)[0]
    if "MASTER_PORT" not in environ and environ.get("SLURM_JOB_ID"):
        added["MASTER_PORT"] = str(rendezvous_port(environ["SLURM_JOB_ID"]))
    environ.update(added)
    return added


def local_device_index(local_rank: int, visible_devices: int) -> int:
    """The GPU a task uses: its local rank modulo the devices it sees, so one task per GPU works
    both when every task sees the whole node and under ``--gpus-per-task`` / ``--gpu-bind``
    (each task sees one device: index 0)."""
    if visible_devices < 1:
        raise RuntimeError("device: cuda, but this task sees no GPU (check --gpus-per-node / CUDA_VISIBLE_DEVICES)")
    return local_rank % visible_devices


def job_id(environ=os.environ) -> Optional[str]:
    """This job's id (an array task's own id: ``<array job>_<task>``)."""
    if environ.get("SLURM_ARRAY_JOB_ID") and environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{environ['SLURM_ARRAY_JOB_ID']}_{environ['SLURM_ARRAY_TASK_ID']}"
    return environ.get("SLURM_JOB_ID")


def slurm_job_alive(job: str) -> Optional[bool]:
    """True if Slurm runs the job now, False if it does not, None if Slurm cannot be asked."""
    if shutil.which("squeue") is None:
        return None
    try:
        result = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if result.returncode != 0:
        # "Invalid job id specified": the controller has forgotten the job, so it is not running.
        return False if "Invalid job id" in result.stderr else None
    return any(
        state in ("RUNNING", "COMPLETING", "SUSPENDED", "CONFIGURING", "STOPPED") for state in result.stdout.split()
    )


# ------------------------------------------------------------------------------- the run lock


class LockHeld(RuntimeError):
    """Another live job or process writes this checkpoint directory."""


class RunLock:
    """``<save>/.megatron-let.lock``: which job (Slurm job id, host, pid) writes this checkpoint
    directory. A requeued job (same job id) takes its own lock over; a lock whose job Slurm no
    longer runs, or whose process on this host is gone, is stale and taken over with a warning;
    anything else is refused with a message naming the holder."""

    def __init__(self, directory: str | Path):
        self.path = Path(directory) / LOCK_NAME
        self.me = {"job_id": job_id(), "host": socket.gethostname(), "pid": os.getpid(), "since": time.time()}

    def holder(self) -> Optional[dict]:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: a write was interrupted; treat as stale

    def _stale(self, holder: dict) -> Optional[str]:
        """Why ``holder`` is no longer alive, or None if it may be."""
        if not holder:
            return "the lock file is unreadable"
        if holder.get("job_id"):
            if holder["job_id"] == self.me["job_id"]:
                return f"it is this job's own lock (Slurm job {holder['job_id']}, requeued)"
            alive = slurm_job_alive(holder["job_id"])
            if alive is False:
                return f"Slurm job {holder['job_id']} is no longer running"
            if alive is True:
                return None
        if holder.get("host") == self.me["host"]:
            try:
                os.kill(int(holder.get("pid", -1)), 0)
            except ProcessLookupError:
                return f"process {holder.get('pid')} on {holder['host']} is gone"
            except (PermissionError, ValueError, OverflowError):
                return None
        return None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = self.holder() or {}
            why = self._stale(holder)
            if why is None:
                who = (
                    f"Slurm job {holder.get('job_id')}" if holder.get("job_id") else f"process {holder.get('pid')}"
                ) + f" on {holder.get('host')}"
                raise LockHeld(
                    f"{self.path}: {who} is writing checkpoints to this directory. Two runs must not "
                    "share checkpoint.save; wait for it, cancel it, or delete the lock file if that run is "
                    "gone."
                ) from None
            if not why.startswith("it is this job's own"):
                logger.warning("%s: taking over a stale lock (%s)", self.path, why)
            write_text_atomic(self.path, json.dumps(self.me))
            return
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(self.me))

    def release(self) -> None:
        holder = self.holder()
        if holder and holder.get("pid") == self.me["pid"] and holder.get("host") == self.me["host"]:
            self.path.unlink(missing_ok=True)
