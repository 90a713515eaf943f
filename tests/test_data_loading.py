"""Data loading as Megatron-LM does it: DataLoader workers on one reading rank per tensor-parallel
group, the microbatches broadcast to the other TP ranks; workers leave exit signals to the trainer."""

import json
import os
import signal
import time

import torch

from megatron_let.data.datasets import PretrainingSampler, microbatches

from conftest import tiny_config, torchrun, write_config


class PidDataset(torch.utils.data.Dataset):
    """Samples that say which process read them."""

    def __len__(self):
        return 64

    def __getitem__(self, index):
        return {"tokens": torch.tensor([index, os.getpid()])}


def test_workers_read_megatron_order_and_outlive_slurm_signals():
    sampler = PretrainingSampler(64, consumed_samples=8, micro_batch_size=2, dp_rank=1, dp_size=2)
    batches = microbatches(PidDataset(), sampler, "cpu", num_workers=2)
    first = next(batches)["tokens"]
    second = next(batches)["tokens"]
    workers = {int(pid) for pid in torch.cat([first, second])[:, 1]}
    assert os.getpid() not in workers and len(workers) == 2
    for pid in workers:  # as Slurm signals every process of the job step
        os.kill(pid, signal.SIGTERM)
        os.kill(pid, signal.SIGUSR1)
    time.sleep(0.5)
    rest = [batch["tokens"] for batch in batches]
    indices = [int(i) for batch in [first, second] + rest for i in batch[:, 0]]
    # Megatron-LM's order for DP rank 1 of 2 from sample 8: [10, 11], [14, 15], ...
    assert indices == [i for start in range(8, 64, 4) for i in (start + 2, start + 3)]
    assert len(sampler) == len(indices) // 2


def test_tensor_parallel_ranks_train_on_the_broadcast_batches(tmp_path, token_data):
    """TP 2 with two DataLoader workers on the reading rank trains exactly as TP 1 without any."""
    losses = {}
    for name, overrides in {
        "tp1": ["data.num_workers=0"],
        "tp2_workers": ["parallel.tensor_model_parallel_size=2", "data.num_workers=2"],
    }.items():
        cfg = tiny_config(
            token_data,
            training={"train_iters": 3},
            logging={"log_interval": 1, "jsonl_path": str(tmp_path / f"{name}.jsonl")},
        )
        args = ["--config", str(write_config(tmp_path / f"{name}.yaml", cfg))]
        for item in overrides:
            args += ["--set", item]
        torchrun(2 if "tp2" in name else 1, "-m megatron_let.train", *args)
        records = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        losses[name] = [r["lm_loss"] for r in records if "split" not in r]
    assert len(losses["tp1"]) == 3
    for ours, reference in zip(losses["tp2_workers"], losses["tp1"]):
        assert abs(ours - reference) <= 1e-6 * abs(reference)
