"""The offline teacher cache through its CLI (tools/cache_teacher.py, megatron-let cache-teacher)
and the trainer (distillation.teacher_cache), on real megatron-core.

The cache is written by two processes (the shards split between them); a KD run reading it at
DP 2 has the online run's losses (teacher run in the loop, DP 1) step for step, for the same k.
An interrupted cache (a shard missing, a half-written one left behind) is finished by running the
command again, which rewrites only the missing shard — identical to the first write. A cache that
does not fit the run is refused with the key that differs."""

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, tiny_config, torchrun, write_config

TOP_K = 16


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if "split" not in line]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, token_data):
    root = tmp_path_factory.mktemp("cache")
    cfg = tiny_config(token_data, method="kd", distillation={"alpha": 0.5, "temperature": 2.0, "top_k": TOP_K})
    config = write_config(root / "kd.yaml", cfg)
    cache = root / "cache"
    out = torchrun(2, "tools/cache_teacher.py", "--config", str(config), "--output", str(cache),
                   "--shard-samples", "12", "--dtype", "fp32").stdout  # fmt: skip
    return root, config, cache, out


def test_cache_teacher_reports_its_size_and_writes_every_shard(setup):
    root, _, cache, out = setup
    manifest = json.loads((cache / "cache.json").read_text())
    # 4 steps × 8 samples = 32 samples in shards of 12: 3 shards, split between the 2 processes.
    assert manifest["num_samples"] == 32 and manifest["num_shards"] == 3 and manifest["top_k"] == TOP_K
    assert "3 to write on 2 process(es)" in out
    assert f"top-{TOP_K} logits (fp32 values, int32 ids) = {TOP_K * 8} bytes per token" in out
    shard = torch.load(cache / "shard_000002.pt")
    assert shard["values"].shape == (8, 32, TOP_K) and shard["indices"].dtype == torch.int32
    assert bool((shard["values"][..., :-1] >= shard["values"][..., 1:]).all())  # sorted: any k' <= k works


def test_a_cached_run_at_another_dp_size_equals_the_online_run(setup):
    root, config, cache, _ = setup
    torchrun(1, "-m megatron_let.train", "--config", str(config), "--set", f"checkpoint.save={root / 'online'}")
    torchrun(2, "-m megatron_let.train", "--config", str(config), "--set", f"checkpoint.save={root / 'cached'}",
             "--set", f"distillation.teacher_cache={cache}")  # fmt: skip
    online, cached = records(root / "online" / "metrics.jsonl"), records(root / "cached" / "metrics.jsonl")
    assert [r["iteration"] for r in cached] == [1, 2, 3, 4]
    for a, b in zip(online, cached):
        assert b["lm_loss"] == pytest.approx(a["lm_loss"], rel=1e-6)
        assert b["kd_loss"] == pytest.approx(a["kd_loss"], rel=1e-6) and a["kd_loss"] > 0
    # The cached run paid for no teacher forward (the compute-matched paper's C_Teacher ≈ 0).
    assert cached[-1]["flops_total"] < online[-1]["flops_total"]


def test_an_interrupted_cache_is_finished_by_running_again(setup):
    root, config, cache, _ = setup
    first = torch.load(cache / "shard_000001.pt")
    (cache / "shard_000001.pt").unlink()
    (cache / "shard_000001.pt.partial-12345").write_bytes(b"half a shard")  # a writer killed mid-save
    out = torchrun(1, "tools/cache_teacher.py", "--config", str(config), "--output", str(cache),
                   "--shard-samples", "12", "--dtype", "fp32").stdout  # fmt: skip
    assert "(2 already written, 1 to write on 1 process(es))" in out
    again = torch.load(cache / "shard_000001.pt")
    assert torch.equal(first["values"], again["values"]) and torch.equal(first["indices"], again["indices"])
    assert not list(cache.glob("*.partial-*"))


def run(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, timeout=300)


def test_a_cache_that_does_not_fit_is_refused_by_name(setup):
    root, config, cache, _ = setup
    other = run("-m", "megatron_let.train", "--config", str(config), "--set", "training.seq_length=16",
                "--set", f"distillation.teacher_cache={cache}")  # fmt: skip
    assert other.returncode != 0
    assert "distillation.teacher_cache" in other.stderr and "seq_length=32" in other.stderr
    wider = run("-m", "megatron_let.train", "--config", str(config), "--set", "distillation.top_k=32",
                "--set", f"distillation.teacher_cache={cache}")  # fmt: skip
    assert wider.returncode != 0 and f"holds the top {TOP_K} logits, distillation.top_k=32" in wider.stderr
    changed = run("tools/cache_teacher.py", "--config", str(config), "--output", str(cache), "--top-k", "8",
                  "--shard-samples", "12", "--dtype", "fp32")  # fmt: skip
    assert changed.returncode == 2 and f"top_k={TOP_K}" in changed.stderr and "use another directory" in changed.stderr
