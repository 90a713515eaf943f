"""A fresh model is the same on every layout: its initial weights are a function of the seed and
each parameter's global name only (megatron_let/model/initialization.py), under TP, PP, interleaved PP
and DP alike, and so is the first step's loss.

``tests/harness/init_layouts.py`` builds the real trainer for several layouts per torchrun launch,
dumps each rank's fresh weights as pieces of the global tensors (placed by megatron's own
``sharded_state_dict``) and takes one step; here the pieces are reassembled into full tensors keyed
by global parameter name and compared with the single-process model.
"""

import json
import math
from collections import defaultdict

import pytest
import torch

from conftest import tiny_config, torchrun, write_config

LOSS_RTOL = 1e-6
NUM_LAYERS = 12  # divisible by PP=2, PP=3 and PP=2 × VPP=2 (and PP=2 × VPP=3)
TP, PP, VPP = (
    "parallel.tensor_model_parallel_size",
    "parallel.pipeline_model_parallel_size",
    "parallel.virtual_pipeline_model_parallel_size",
)

# name: (processes, overrides); one launch per process count
LAYOUTS = {
    "tp1": (1, []),
    "tp2": (2, [f"{TP}=2"]),
    "pp2": (2, [f"{PP}=2"]),
    "pp2_vpp2": (2, [f"{PP}=2", f"{VPP}=2"]),
    "dp2": (2, []),
    "pp3": (3, [f"{PP}=3"]),
    "tp2_pp2": (4, [f"{TP}=2", f"{PP}=2"]),
    "pp2_vpp3_dp2": (4, [f"{PP}=2", f"{VPP}=3"]),
}
REFERENCE = "tp1"


class Runs:
    """Per layout: the reassembled initial weights {global name: full tensor} and the first lm loss."""

    def __init__(self, weights: dict, losses: dict):
        self.weights, self.losses = weights, losses

    def __repr__(self):  # keep pytest's failure reports short
        return f"Runs({', '.join(self.losses)})"


def assemble(pieces_per_rank: list) -> dict:
    """Full tensors from every rank's pieces; replicas (DP, TP-replicated norms) must agree."""
    full, filled = {}, {}
    for pieces in pieces_per_rank:
        for key, items in pieces.items():
            for shape, where, data in items:
                if key not in full:
                    full[key] = torch.zeros(shape)
                    filled[key] = torch.zeros(shape, dtype=torch.bool)
                assert tuple(full[key].shape) == tuple(shape), key
                index = tuple(slice(*w) if isinstance(w, (tuple, list)) else w for w in where)
                seen = filled[key][index]
                assert torch.equal(full[key][index][seen], data[seen]), f"{key}: replicas differ"
                full[key][index] = data
                filled[key][index] = True
    for key in full:
        assert bool(filled[key].all()), f"{key}: not every element was dumped"
    return full


@pytest.fixture(scope="module")
def runs(tmp_path_factory, token_data):
    root = tmp_path_factory.mktemp("initialization")
    base = write_config(
        root / "base.yaml",
        tiny_config(
            token_data,
            teacher=None,
            model={"num_layers": NUM_LAYERS},
            training={"micro_batch_size": 1, "global_batch_size": 12, "train_iters": 1},
        ),
    )
    by_processes = defaultdict(list)
    for name, (nproc, overrides) in LAYOUTS.items():
        by_processes[nproc].append(f"{name}:{','.join(overrides)}")
    for nproc, layouts in sorted(by_processes.items()):
        torchrun(
            nproc,
            "tests/harness/init_layouts.py",
            "--config",
            str(base),
            "--out",
            str(root),
            *[arg for layout in layouts for arg in ("--layout", layout)],
        )
    weights, losses = {}, {}
    for name, (nproc, _) in LAYOUTS.items():
        weights[name] = assemble([torch.load(root / name / f"rank{r}.pt") for r in range(nproc)])
        losses[name] = json.loads((root / name / "metrics.json").read_text())["lm_loss"]
    return Runs(weights, losses)


def layers_of(weights: dict) -> dict:
    """{global layer index: {name within the layer: tensor}}. megatron's checkpoint stacks the
    layers: ``decoder.layers.NAME`` has the global layer index as its first axis."""
    layers = defaultdict(dict)
    for key, tensor in weights.items():
        if key.startswith("decoder.layers."):
            assert tensor.shape[0] == NUM_LAYERS, key
            for index in range(NUM_LAYERS):
                layers[index][key[len("decoder.layers.") :]] = tensor[index]
    return layers


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != REFERENCE])
def test_initial_weights_match_single_process(runs, layout):
    ours, ref = runs.weights[layout], runs.weights[REFERENCE]
    assert ours.keys() == ref.keys()
    assert len(layers_of(ref)) == NUM_LAYERS
    differences = {key: float((ours[key] - ref[key]).abs().max()) for key in ref}
    print(f"\n{layout}: max |Δw| {max(differences.values()):.3g} over {len(ref)} tensors")
    assert all(d == 0.0 for d in differences.values()), {k: d for k, d in differences.items() if d}


@pytest.mark.parametrize("layout", [name for name in LAYOUTS if name != REFERENCE])
def test_first_step_loss_matches_single_process(runs, layout):
    losses = runs.losses
    print(
        f"\n{layout}: lm loss {losses[layout]!r} vs {losses[REFERENCE]!r}, "
        f"relative difference {abs(losses[layout] / losses[REFERENCE] - 1):.2e}"
    )
    assert math.isfinite(losses[layout])
    assert losses[layout] == pytest.approx(losses[REFERENCE], rel=LOSS_RTOL)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_no_two_layers_start_identical(runs, layout):
    """Every randomly initialised tensor (not the unit norms, not zero biases) differs between any
    two layers: no stage or virtual chunk repeats another's draws."""
    layers = layers_of(runs.weights[layout])
    random_names = [name for name, tensor in layers[0].items() if float(tensor.std()) > 0]
    assert {
        "self_attention.linear_qkv.weight",
        "self_attention.linear_proj.weight",
        "mlp.linear_fc1.weight",
        "mlp.linear_fc2.weight",
    } <= set(random_names)
    for i in layers:
        for j in layers:
            if i < j:
                for name in random_names:
                    assert not torch.equal(layers[i][name], layers[j][name]), (layout, i, j, name)


def test_embedding_and_output_layer_are_distinct_draws(runs):
    ref = runs.weights[REFERENCE]
    words, output = ref["embedding.word_embeddings.weight"], ref["output_layer.weight"]
    assert words.shape == output.shape
    assert not torch.equal(words, output)
    assert 0.015 < float(words.std()) < 0.025  # megatron's init_method_std = 0.02


def test_real_vocabulary_rows_do_not_depend_on_the_padding():
    """The padded vocabulary grows with TP (a multiple of make_vocab_size_divisible_by × TP): the
    rows of real tokens stay the same draw, and each TP shard is its slice of the full tensor."""
    from functools import partial

    from megatron_let.model import initialization

    init = partial(torch.nn.init.normal_, mean=0.0, std=0.02)
    with initialization.build_scope(1234):
        tp1 = torch.empty(512, 16)
        initialization._init_vocab_shard(tp1, "embedding.word_embeddings.weight", 500, 512, 0, init)
        full = torch.empty(1024, 16)
        initialization._init_vocab_shard(full, "embedding.word_embeddings.weight", 500, 1024, 0, init)
        shard = torch.empty(256, 16)  # rank 2 of TP=4 over 1024 padded rows
        initialization._init_vocab_shard(shard, "embedding.word_embeddings.weight", 500, 1024, 512, init)
    assert torch.equal(tp1[:500], full[:500])
    assert torch.equal(shard, full[512:768])
