"""One LET step under TP / PP / DP / SP layouts equals the single-process step.

Everything runs through the real trainer on real megatron-core in several gloo processes:
``tests/harness/one_step.py`` takes one step and dumps its gradients as a dist-checkpoint, which
``tests/harness/read_grads.py`` reads back at TP=PP=1 (megatron's own resharding). The
single-process step is itself checked against plain autograd of Σ_m (LM_m + λ·L_align,m) / M,
computed without the hook, the aux-loss scaler or megatron's schedule.
"""

import json

import pytest
import torch

from conftest import tiny_config, torchrun, write_config

LOSS_RTOL = 1e-6
ALIGN_ATOL = 1e-8  # absolute, on an alignment loss of order 1e-3
GRAD_RTOL = 1e-5  # max |Δg| relative to max |g|, per tensor (fp32; TP changes reduction order)

# name: (processes, target layer k, teacher heads, overrides)
LAYOUTS = {
    "tp2": (2, 3, 2, ["parallel.tensor_model_parallel_size=2"]),
    "tp2_replicated_teacher": (2, 3, 3, ["parallel.tensor_model_parallel_size=2"]),
    "pp2_k_on_stage1": (2, 3, 2, ["parallel.pipeline_model_parallel_size=2"]),
    # k = 2 is the last layer of stage 0: the hook's output is the stage output, which megatron
    # frees after sending it (deallocate_pipeline_outputs, on as on GPU) — it must not be a view.
    "pp2_k_on_stage0": (2, 2, 2, ["parallel.pipeline_model_parallel_size=2"]),
    "pp2_interleaved": (
        2,
        3,
        2,
        ["parallel.pipeline_model_parallel_size=2", "parallel.virtual_pipeline_model_parallel_size=2"],
    ),
    "dp2": (2, 3, 2, []),
    "tp2_sequence_parallel": (2, 3, 2, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]),
    "tp2_pp2": (4, 3, 2, ["parallel.tensor_model_parallel_size=2", "parallel.pipeline_model_parallel_size=2"]),
    # megatron DDP reducing gradient buckets during the backward (small buckets: several per chunk),
    # with the interleaved schedule's per-chunk grad-sync hooks.
    "dp2_overlap_grad_reduce": (2, 3, 2, ["parallel.overlap_grad_reduce=true", "parallel.ddp_bucket_size=20000"]),
    "pp2_vpp2_dp2_overlap_grad_reduce": (
        4,
        3,
        2,
        [
            "parallel.pipeline_model_parallel_size=2",
            "parallel.virtual_pipeline_model_parallel_size=2",
            "parallel.overlap_grad_reduce=true",
            "parallel.ddp_bucket_size=20000",
        ],
    ),
    # Activation recompute: layer k first runs without a graph, then again in the backward pass;
    # the alignment loss must be attached exactly once, to the recomputed pass (k = 2 is stage 0's
    # last layer, recomputed uniformly one layer at a time; k = 3 opens stage 1, recomputed as a block).
    "pp2_full_recompute_k_on_stage0": (
        2,
        2,
        2,
        [
            "parallel.pipeline_model_parallel_size=2",
            "parallel.recompute_granularity=full",
            "parallel.recompute_method=uniform",
            "parallel.recompute_num_layers=1",
        ],
    ),
    "pp2_full_recompute_k_on_stage1": (
        2,
        3,
        2,
        [
            "parallel.pipeline_model_parallel_size=2",
            "parallel.recompute_granularity=full",
            "parallel.recompute_method=block",
            "parallel.recompute_num_layers=2",
        ],
    ),
    "tp2_selective_recompute": (
        2,
        3,
        2,
        ["parallel.tensor_model_parallel_size=2", "parallel.recompute_granularity=selective"],
    ),
}
# With dropout the masks depend on the layout, so recompute is compared with the same layout
# without it: the recomputed pass must replay the first pass's dropout masks (megatron restores the
# generators, our CPU tracker's streams included).
DROPOUT = ["parallel.pipeline_model_parallel_size=2", "model.hidden_dropout=0.1", "model.attention_dropout=0.1"]
RECOMPUTE_PAIRS = {
    "pp2_dropout_full_recompute": (
        "pp2_dropout",
        DROPOUT
        + [
            "parallel.recompute_granularity=full",
            "parallel.recompute_method=uniform",
            "parallel.recompute_num_layers=2",
        ],
    ),
}
EXPECTED_TEACHER_RANKS = {  # megatron's rank order is TP fastest, then DP, then PP
    "tp2": [0, 1],
    "tp2_replicated_teacher": [0, 1],
    "pp2_k_on_stage1": [1],
    "pp2_k_on_stage0": [0],
    "pp2_interleaved": [0],
    "dp2": [0, 1],
    "tp2_sequence_parallel": [0, 1],
    "tp2_pp2": [2, 3],
    "dp2_overlap_grad_reduce": [0, 1],
    "pp2_vpp2_dp2_overlap_grad_reduce": [0, 1],
    "pp2_full_recompute_k_on_stage0": [0],
    "pp2_full_recompute_k_on_stage1": [1],
    "tp2_selective_recompute": [0, 1],
}


def teacher_model(heads: int) -> dict:
    return {
        "num_layers": 2,
        "hidden_size": 48,
        "num_attention_heads": heads,
        "num_query_groups": None,
        "ffn_hidden_size": 96,
        "vocab_size": 512,
        "max_position_embeddings": 64,
        "normalization": "LayerNorm",
        "activation": "gelu",
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory, token_data):
    root = tmp_path_factory.mktemp("equivalence")
    base = write_config(root / "base.yaml", tiny_config(token_data, optimizer={"clip_grad": 0.0}))
    # The starting target and two small "pretrained" teachers, written by the trainer itself.
    torchrun(
        1,
        "-m megatron_let.train",
        "--config",
        str(base),
        "--set",
        "training.train_iters=0",
        "--set",
        f"checkpoint.save={root / 'init'}",
    )
    for heads in (2, 3):
        teacher_cfg = tiny_config(
            token_data,
            teacher=None,
            model=teacher_model(heads),
            training={"train_iters": 2},
            checkpoint={"save": str(root / f"teacher{heads}")},
        )
        torchrun(1, "-m megatron_let.train", "--config", str(write_config(root / f"teacher{heads}.yaml", teacher_cfg)))

    def step(name, nproc, layer, heads, overrides, teacher=True):
        args = [
            "--config",
            str(base),
            "--out",
            str(root / name),
            "--set",
            f"checkpoint.load={root / 'init'}",
            "--set",
            f"alignment.target_layer={layer}",
        ]
        if teacher:
            args += [
                "--set",
                f"teacher.load={root / f'teacher{heads}'}",
                "--set",
                f"teacher.model.num_attention_heads={heads}",
            ]
        else:
            args += ["--set", "teacher=null"]
        for item in overrides:
            args += ["--set", item]
        torchrun(nproc, "tests/harness/one_step.py", *args)
        return json.loads((root / name / "metrics.json").read_text())

    metrics = {
        "reference_k3": step("reference_k3", 1, 3, 2, []),
        "reference_k2": step("reference_k2", 1, 2, 2, []),
        "reference_k3_teacher3": step("reference_k3_teacher3", 1, 3, 3, []),
        "no_alignment": step("no_alignment", 1, 3, 2, [], teacher=False),
    }
    for name, (nproc, layer, heads, overrides) in LAYOUTS.items():
        metrics[name] = step(name, nproc, layer, heads, overrides)
    for name, (without, overrides) in RECOMPUTE_PAIRS.items():
        metrics[without] = step(without, 2, 3, 2, DROPOUT)
        metrics[name] = step(name, 2, 3, 2, overrides)
    names = list(metrics)
    torchrun(
        1,
        "tests/harness/read_grads.py",
        "--config",
        str(base),
        "--out",
        str(root / "grads.pt"),
        "--set",
        f"checkpoint.load={root / 'init'}",
        "--set",
        f"teacher.load={root / 'teacher2'}",
        "--direct",
        *[str(root / name / "grads") for name in names],
    )
    loaded = torch.load(root / "grads.pt")
    grads = {name: loaded[str(root / name / "grads")] for name in names}
    grads["direct_k3"] = loaded["direct"]
    return metrics, grads


def reference_for(layer: int, heads: int) -> str:
    return {(3, 2): "reference_k3", (2, 2): "reference_k2", (3, 3): "reference_k3_teacher3"}[(layer, heads)]


def max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp(min=1e-12)) for n in a)


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_losses_match_single_process(runs, layout):
    metrics, _ = runs
    _, layer, heads, _ = LAYOUTS[layout]
    ours, ref = metrics[layout], metrics[reference_for(layer, heads)]
    print(
        f"\n{layout}: lm loss {ours['lm_loss']!r} vs {ref['lm_loss']!r}, "
        f"alignment loss {ours['alignment_loss']!r} vs {ref['alignment_loss']!r}"
    )
    assert ours["lm_loss"] == pytest.approx(ref["lm_loss"], rel=LOSS_RTOL)
    # The alignment loss is a mean of per-token cosines near 0 at initialisation (|loss| ~ 1e-3):
    # fp32 summation order across TP shards shows in its relative error, so bound it absolutely too.
    assert ours["alignment_loss"] == pytest.approx(ref["alignment_loss"], rel=LOSS_RTOL, abs=ALIGN_ATOL)
    assert ours["cosine_similarity"] == pytest.approx(-ref["alignment_loss"], rel=LOSS_RTOL, abs=ALIGN_ATOL)
    assert ours["lambda"] == ref["lambda"] == 0.1
    assert ours["deallocate_pipeline_outputs"]  # the GPU setting, under which a view output crashes
    granularity = next(
        (o.split("=")[1] for o in LAYOUTS[layout][3] if o.startswith("parallel.recompute_granularity")), None
    )
    assert ours["recompute_granularity"] == granularity


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_gradients_match_single_process(runs, layout):
    _, grads = runs
    _, layer, heads, _ = LAYOUTS[layout]
    difference = max_relative_difference(grads[layout], grads[reference_for(layer, heads)])
    print(f"\n{layout}: max relative gradient difference {difference:.2e}")  # shown with pytest -s
    assert difference < GRAD_RTOL


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_teacher_lives_only_on_the_stage_owning_layer_k(runs, layout):
    metrics, _ = runs
    assert metrics[layout]["teacher_ranks"] == EXPECTED_TEACHER_RANKS[layout]


@pytest.mark.parametrize("layout", list(RECOMPUTE_PAIRS))
def test_recompute_replays_dropout_and_alignment(runs, layout):
    metrics, grads = runs
    without = RECOMPUTE_PAIRS[layout][0]
    assert metrics[layout]["recompute_granularity"] == "full" and metrics[without]["recompute_granularity"] is None
    for key in ("lm_loss", "alignment_loss"):
        assert metrics[layout][key] == pytest.approx(metrics[without][key], rel=LOSS_RTOL, abs=ALIGN_ATOL)
    difference = max_relative_difference(grads[layout], grads[without])
    print(f"\n{layout}: max relative gradient difference {difference:.2e}")
    assert difference < GRAD_RTOL
    # ...and dropout is really on: the step differs from the dropout-free one.
    assert metrics[without]["lm_loss"] != pytest.approx(metrics["reference_k3"]["lm_loss"], rel=1e-4)


def test_single_process_step_equals_direct_autograd_of_total_loss(runs):
    _, grads = runs
    difference = max_relative_difference(grads["reference_k3"], grads["direct_k3"])
    print(f"\nsingle process vs direct autograd: max relative gradient difference {difference:.2e}")
    assert difference < GRAD_RTOL


def test_alignment_gradient_reaches_exactly_the_layers_up_to_k(runs):
    """Without the alignment term, layers ≤ k (and the embedding) get different gradients; layers
    after k get bit-for-bit the same ones (the alignment loss does not depend on them)."""
    metrics, grads = runs
    with_let, without = grads["reference_k3"], grads["no_alignment"]
    assert metrics["no_alignment"]["alignment_loss"] is None
    assert metrics["no_alignment"]["lm_loss"] == pytest.approx(metrics["reference_k3"]["lm_loss"], rel=1e-12)
    for name in with_let:
        delta = float((with_let[name] - without[name]).abs().max() / without[name].abs().max().clamp(min=1e-12))
        if name.startswith("decoder.layers."):
            layer_number = int(name.split(".")[2]) + 1
            if layer_number <= 3:
                assert delta > 1e-3, name
            else:
                assert delta < 1e-6, name
        elif name.startswith("embedding."):
            assert delta > 1e-4, name
        else:  # final norm, output layer: after layer k
            assert delta < 1e-6, name
