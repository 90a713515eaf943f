"""Dropout under tensor parallelism: each dropout draws from the stream megatron intends, and every
stream is checkpointed, so a resumed run with dropout continues the uninterrupted one exactly."""

import json

import pytest
import torch

from conftest import tiny_config, torchrun, write_config

LOSS_RTOL = 1e-6
TP2 = {"tensor_model_parallel_size": 2}
DROPOUT = {"hidden_dropout": 0.1, "attention_dropout": 0.1}


def train_records(path):
    """The last record of each training iteration (a resumed launch may repeat some)."""
    records = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if "split" not in record:
                records[record["iteration"]] = record
    return records


def test_tp2_dropout_resume_continues_the_same_loss_curve(tmp_path, token_data):
    """TP=2, hidden and attention dropout 0.1, LET on: 4 steps straight == 2 steps, exit, resume
    from the checkpoint, 2 more. Needs the RNG tracker's model-parallel stream (attention dropout)
    in the checkpoint, besides the default generators."""
    common = dict(model=DROPOUT, parallel=TP2, training={"train_iters": 4})
    straight = write_config(
        tmp_path / "straight.yaml", tiny_config(token_data, checkpoint={"save": str(tmp_path / "straight")}, **common)
    )
    resumed = write_config(
        tmp_path / "resumed.yaml",
        tiny_config(
            token_data, checkpoint={"save": str(tmp_path / "resumed"), "load": str(tmp_path / "resumed")}, **common
        ),
    )
    torchrun(2, "-m megatron_let.train", "--config", str(straight))
    first = torchrun(2, "-m megatron_let.train", "--config", str(resumed), "--set", "training.exit_interval=2")
    assert "exit interval" in first.stdout
    assert (tmp_path / "resumed" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    second = torchrun(2, "-m megatron_let.train", "--config", str(resumed))
    assert "loaded checkpoint" in second.stdout and "at iteration 2" in second.stdout

    a = train_records(tmp_path / "straight" / "metrics.jsonl")
    b = train_records(tmp_path / "resumed" / "metrics.jsonl")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    for iteration in a:
        ra, rb = a[iteration], b[iteration]
        print(
            f"\niteration {iteration}: lm loss {ra['lm_loss']!r} vs {rb['lm_loss']!r}, "
            f"relative difference {abs(rb['lm_loss'] / ra['lm_loss'] - 1):.2e}"
        )
        assert rb["lm_loss"] == pytest.approx(ra["lm_loss"], rel=LOSS_RTOL), iteration
        assert rb["alignment_loss"] == pytest.approx(ra["alignment_loss"], rel=LOSS_RTOL), iteration
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-5), iteration


def test_attention_dropout_differs_across_tp_ranks_hidden_dropout_does_not(tmp_path, token_data):
    """Attention dropout (over each rank's own heads) draws from the tracker's model-parallel
    stream, different per TP rank; hidden dropout (over activations replicated across TP) from the
    default generator, identical on both ranks. The tracker's states round-trip."""
    cfg = write_config(
        tmp_path / "run.yaml",
        tiny_config(token_data, teacher=None, parallel=TP2, model={"hidden_dropout": 0.5, "attention_dropout": 0.5}),
    )
    torchrun(2, "tests/harness/dropout_streams.py", "--config", str(cfg), "--out", str(tmp_path / "out.pt"))
    out = torch.load(tmp_path / "out.pt")
    assert not torch.equal(out["mp_states"][0], out["mp_states"][1])
    assert torch.equal(out["default_states"][0], out["default_states"][1])
    # The same inputs on both ranks: equal outputs iff equal dropout masks.
    assert torch.equal(out["attention_eval"][0], out["attention_eval"][1])
    assert not torch.equal(out["attention"][0], out["attention"][1])
    assert not torch.equal(out["attention"][0], out["attention_eval"][0])  # dropout is on
    for rank in range(2):
        assert torch.equal(out["attention_again"][rank], out["attention"][rank])  # set_states(get_states())
    assert torch.equal(out["hidden"][0], out["hidden"][1])


def test_cpu_tracker_forks_megatron_streams_and_round_trips():
    """In-process: the CPU tracker's model-parallel stream is megatron's (seed + 2718 + TP rank),
    fork() leaves the default generator alone, nested forks keep each stream's progress, and
    set_tracker_states(tracker_states()) rewinds it."""
    from megatron.core.tensor_parallel import random as megatron_random

    from megatron_let.platform import rng

    def stream(seed, n):
        return torch.rand(n, generator=torch.Generator().manual_seed(seed))

    with torch.random.fork_rng(devices=[]):
        try:
            rng.install_cpu_rng_tracker(1234, tp_rank=1)
            tracker = megatron_random.get_cuda_rng_tracker()
            assert isinstance(tracker, megatron_random.CudaRNGStatesTracker) and tracker.is_initialized()
            torch.manual_seed(0)
            default_before = torch.get_rng_state()
            saved = rng.tracker_states()
            with tracker.fork():
                first = torch.rand(4)
                with tracker.fork(megatron_random.get_data_parallel_rng_tracker_name()):
                    data_parallel = torch.rand(4)
                second = torch.rand(4)
            assert torch.equal(torch.get_rng_state(), default_before)
            assert torch.equal(torch.cat([first, second]), stream(1234 + 2718 + 1, 8))
            assert torch.equal(data_parallel, stream(1234, 4))
            rng.set_tracker_states(saved)
            with tracker.fork():
                assert torch.equal(torch.rand(4), first)
        finally:
            megatron_random.initialize_rng_tracker(force_reset=True)
