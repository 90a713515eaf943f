"""Stop requests: the signals that ask a run to save after the current step and exit.

Slurm signals every process of a job step (preemption, time limit, ``scontrol requeue``,
``scancel --signal``), and may do so while a process is still importing megatron. So the
trainer listens from its first line (:func:`listen_early`), and the step loop asks
:func:`received` once per step. Process-wide state, like the signal dispositions themselves.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Iterable, Optional

DEFAULT = ("SIGTERM", "SIGUSR1")  # training.exit_signals' default

_received: Optional[str] = None
_listening: set[str] = set()


def _note(signum, frame) -> None:
    global _received
    _received = _received or signal.Signals(signum).name


def listen(names: Iterable[str]) -> None:
    """Record (instead of dying on) each of ``names``; stop listening to any other signal."""
    names = set(names)
    for name in _listening - names:
        signal.signal(getattr(signal, name), signal.SIG_DFL)
    for name in names:
        signal.signal(getattr(signal, name), _note)
    _listening.clear()
    _listening.update(names)


def listen_early() -> None:
    """Before the config is read: the default exit signals. Under the sbatch script, each task
    then marks itself in ``$MEGATRON_LET_LISTENING_DIR`` (named by its Slurm rank): the script
    holds back a signal it is to forward until every task listens, since before that the signal
    would kill the task instead of stopping it."""
    listen(DEFAULT)
    directory = os.environ.get("MEGATRON_LET_LISTENING_DIR")
    if directory:
        Path(directory).mkdir(parents=True, exist_ok=True)
        (Path(directory) / os.environ.get("SLURM_PROCID", os.environ.get("RANK", "0"))).touch()


def received() -> Optional[str]:
    """The first exit signal this process got, by name, or None."""
    return _received


def ignore_from_now_on() -> None:
    """Once the run has ended (saved and reported), a late exit signal must not kill the process:
    Python restores the default disposition of every signal with a Python handler while it shuts
    down, so a signal then would turn a finished run into a killed one. Ignored signals stay ignored."""
    for name in _listening:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
