"""Every shipped example YAML loads and builds its model at its own TP / PP / VPP / sequence
parallelism, and takes one training step — on the CPU, with what only a GPU cluster has replaced:
fewer layers (a multiple of the stages, k still inside), a small random teacher in place of the
pretrained one (its weights are not shipped), megatron's mock data, fp32, a short sequence, one
micro-batch per data-parallel rank. The widths (hidden, FFN, heads, query groups, vocabulary) stay
the example's: a dimension that TP cannot split must fail here, not on the cluster. Two exceptions,
for the CPU's memory and time: a vocabulary beyond 2^16 rows (Llama 3's 128256) is cut to 32768 —
megatron pads any vocabulary to a multiple of 128 × TP, so its size is nothing TP can fail to
split, while the 7B target's embedding and output layer at 128256 rows would take 17 GB with Adam on
the CPU — and a baseline (no teacher, so no layer k to keep) builds one layer per pipeline chunk."""

from pathlib import Path

import pytest
import yaml

from conftest import REPO, RUN_EXAMPLES, torchrun, write_config

EXAMPLES = RUN_EXAMPLES


def cpu_twin(raw: dict) -> tuple[dict, int]:
    cfg = yaml.safe_load(yaml.safe_dump(raw))
    par = cfg.setdefault("parallel", {})
    tp = par.get("tensor_model_parallel_size", 1)
    pp = par.get("pipeline_model_parallel_size", 1)
    vpp = par.get("virtual_pipeline_model_parallel_size") or 1
    par["use_distributed_optimizer"] = False  # gloo has no reduce-scatter
    cfg["device"] = "cpu"
    model = cfg["model"]
    if cfg.get("teacher") is not None:
        model["num_layers"] = pp * vpp * max(1, -(-3 // (pp * vpp)))  # >= 3: the early layer k = 3 exists
    else:
        model["num_layers"] = pp * vpp
    if model.get("vocab_size", 512) > 2**16:
        model["vocab_size"] = 32768
    if cfg.get("teacher") is not None:
        cfg["teacher"] = {
            "model": {
                "num_layers": 2,
                "hidden_size": 64,
                "num_attention_heads": 4,
                "ffn_hidden_size": 128,
                "vocab_size": model["vocab_size"],
                "max_position_embeddings": 128,
            }
        }
    cfg["training"] = dict(
        cfg.get("training", {}), train_iters=1, precision="fp32", micro_batch_size=1, global_batch_size=1, seq_length=64
    )
    cfg["data"] = {"mock_data": True}
    cfg["checkpoint"] = {}
    cfg["logging"] = {"log_interval": 1}
    cfg["eval"] = {"test_at_end": False}
    return cfg, tp * pp


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_builds_and_steps_at_its_layout(example: Path, tmp_path):
    raw = yaml.safe_load(example.read_text())
    cfg, processes = cpu_twin(raw)
    result = torchrun(
        processes, "-m megatron_let.train", "--config", str(write_config(tmp_path / example.name, cfg)), timeout=900
    )
    par = raw.get("parallel", {})
    layout = f"TP {par.get('tensor_model_parallel_size', 1)} × PP {par.get('pipeline_model_parallel_size', 1)} × DP 1"
    assert layout in result.stdout and "iteration      1/1" in result.stdout, result.stdout[-3000:]


def test_an_ffn_that_tp_cannot_split_is_named(tmp_path):
    from megatron_let.config import ConfigError, load_config

    raw = yaml.safe_load((REPO / "examples" / "let_7b_smollm2.yaml").read_text())
    raw["teacher"] = None
    raw["model"]["ffn_hidden_size"] = 5461
    with pytest.raises(
        ConfigError,
        match=r"model\.ffn_hidden_size: 5461 is not divisible by "
        r"tensor_model_parallel_size=2",
    ):
        load_config(write_config(tmp_path / "bad.yaml", raw))
