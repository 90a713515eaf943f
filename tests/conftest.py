"""Shared test helpers: tiny indexed datasets, configs, and torchrun launches of real megatron-core."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
VOCAB = 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, script: str, *args: str, timeout: int = 600, env=None) -> subprocess.CompletedProcess:
    """Launch ``script`` (a path or ``-m module``) under torchrun on the CPU; raise with its output on failure."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}"]
    cmd += ["-m", script[3:]] if script.startswith("-m ") else [script]
    cmd += list(args)
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)
    if result.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
        )
    return result


def write_token_dataset(prefix: Path, n_docs: int = 64, seed: int = 0, vocab: int = VOCAB) -> Path:
    """An indexed dataset of random token documents (for equivalence tests: any tokens will do),
    written with megatron's own IndexedDatasetBuilder."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32)
    for _ in range(n_docs):
        length = int(rng.integers(20, 120))
        doc = rng.integers(0, vocab - 1, size=length).tolist() + [vocab - 1]  # EOD = vocab - 1
        builder.add_document(torch.tensor(doc, dtype=torch.int32), [len(doc)])
    builder.finalize(str(prefix) + ".idx")
    return prefix


def tiny_config(data_prefix: Path, **sections) -> dict:
    """A tiny LET run on the CPU: 4-layer target (width 64, GQA), 2-layer teacher of width 48."""
    cfg = {
        "device": "cpu",
        "model": {
            "num_layers": 4,
            "hidden_size": 64,
            "num_attention_heads": 4,
            "num_query_groups": 2,
            "ffn_hidden_size": 128,
            "vocab_size": VOCAB,
            "max_position_embeddings": 64,
        },
        "teacher": {
            "model": {
                "num_layers": 2,
                "hidden_size": 48,
                "num_attention_heads": 2,
                "ffn_hidden_size": 96,
                "vocab_size": VOCAB,
                "max_position_embeddings": 64,
                "normalization": "LayerNorm",
                "activation": "gelu",
            }
        },
        "alignment": {"target_layer": 3, "lambda0": 0.1, "stop_step": 100},
        "training": {"micro_batch_size": 2, "global_batch_size": 8, "seq_length": 32, "train_iters": 4},
        "optimizer": {"lr": 1e-3},
        "data": {"data_path": [str(data_prefix)], "split": "90,5,5", "eod_token_id": VOCAB - 1},
        "logging": {"log_interval": 1},
        "eval": {"test_at_end": False},
    }
    for section, values in sections.items():
        if values is None:
            cfg[section] = None
        elif isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


# The shipped run configs (the study files, examples/study_*.yaml, are tests/test_study.py's).
RUN_EXAMPLES = sorted(p for p in (REPO / "examples").glob("*.yaml") if not p.name.startswith("study_"))

QUICKSTART_SMOKE = ["quickstart", "--smoke", "--max-docs", "40"]


@pytest.fixture(scope="session")
def quickstart_smoke(tmp_path_factory):
    """`megatron-let quickstart --smoke` run once: (its work directory, the completed process).
    Its corpus, tokenizer and teacher also serve the study examples (tests/test_study.py)."""
    work = tmp_path_factory.mktemp("quickstart") / "qs"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    command = [sys.executable, "-m", "megatron_let.cli", *QUICKSTART_SMOKE, "--work-dir", str(work)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return work, command, env


@pytest.fixture(scope="session")
def token_data(tmp_path_factory):
    return write_token_dataset(tmp_path_factory.mktemp("data") / "tokens")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real single-node Slurm (slurmctld + slurmd + munge on localhost, tests/slurm/cluster.sh);
    the tests using it skip, saying why, where slurmd cannot run."""
    from slurm_cluster import SlurmCluster

    cluster = SlurmCluster().start(tmp_path_factory.mktemp("slurm"))
    yield cluster
    cluster.stop()
