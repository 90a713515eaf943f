"""Logit and hidden-layer distillation (method kd / rkd / salt / hldc) through the real trainer on
real megatron-core.

One step under TP 2 (with and without sequence parallelism), PP 2 and DP 2 equals the
single-process step (losses and every gradient, hldc's regressor W_R included, read back at
TP=PP=1 through megatron's resharding); the single-process step equals plain autograd of
Σ_m mean_t[(1 − α)·NLL + α·τ²·KL (+ γ·hint)] / M written with torch's own cross-entropy,
log_softmax, top-k, normalize and mse_loss on full logits. The vocabulary (500) is padded (to 512), and the teachers
pad or split it differently from the target: split into other widths (teacher A at TP 2), or
replicated on each TP rank (teacher B, whose 3 heads do not divide TP 2). SALT switches to NLL
exactly at its step, and a run resumed from a checkpoint continues with identical losses.
"""

import json

import pytest
import torch

from conftest import tiny_config, torchrun, write_config, write_token_dataset

VOCAB = 500  # padded to 512 by the target
LOSS_RTOL = 1e-6
# A KL of order 1e-3 sums V/TP terms per rank, then across ranks: fp32 order shows at ~1e-8.
KL_ATOL = 5e-8
GRAD_RTOL = 1e-5


def teacher(heads: int, divisible_by: int) -> dict:
    return {
        "num_layers": 2,
        "hidden_size": 48,
        "num_attention_heads": heads,
        "ffn_hidden_size": 96,
        "vocab_size": VOCAB,
        "make_vocab_size_divisible_by": divisible_by,
        "max_position_embeddings": 64,
        "normalization": "LayerNorm",
        "activation": "gelu",
    }


TEACHERS = {"A": teacher(2, 100), "B": teacher(3, 128)}  # A: 500 columns at TP 1, 2 × 300 at TP 2
KD = ["method=kd", "distillation.alpha=0.6", "distillation.temperature=2.0", "distillation.top_k=16"]
REVERSE = ["method=rkd", "distillation.alpha=0.4", "distillation.temperature=1.5", "distillation.top_k=null"]
REVERSE += ["distillation.reverse=true"]
# γ large enough that the hint term's gradient is a visible part of the step's.
HLDC = ["method=hldc", "distillation.alpha=0.6", "distillation.temperature=2.0", "distillation.top_k=16"]
HLDC += ["hld.gamma=2.0"]
# hldf's phase 1 (the first step): the hint loss alone, layers 3–4 not run (zero gradient).
HLDF = ["method=hldf", "hld.phase1_iters=2", "distillation.top_k=16"]
TP2_SP = ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]
# name: (processes, teacher, method overrides, layout overrides, reference)
STEPS = {
    "reference": (1, "A", KD, [], None),
    "tp2": (2, "A", KD, ["parallel.tensor_model_parallel_size=2"], "reference"),
    "pp2": (2, "A", KD, ["parallel.pipeline_model_parallel_size=2"], "reference"),
    "dp2": (2, "A", KD, [], "reference"),
    "tp2_sequence_parallel": (
        2,
        "A",
        KD,
        ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
        "reference",
    ),
    "reverse_reference": (1, "B", REVERSE, [], None),
    "reverse_tp2_replicated_teacher": (2, "B", REVERSE, ["parallel.tensor_model_parallel_size=2"], "reverse_reference"),
    # hldc: the hint layer (student 2 of 4) is on stage 0 at PP 2, the logits on stage 1.
    "hldc_reference": (1, "A", HLDC, [], None),
    "hldc_tp2_sequence_parallel": (2, "A", HLDC, TP2_SP, "hldc_reference"),
    "hldc_pp2": (2, "A", HLDC, ["parallel.pipeline_model_parallel_size=2"], "hldc_reference"),
    "hldf_reference": (1, "A", HLDF, [], None),
    "hldf_tp2_sequence_parallel": (2, "A", HLDF, TP2_SP, "hldf_reference"),
    "hldf_pp2": (2, "A", HLDF, ["parallel.pipeline_model_parallel_size=2"], "hldf_reference"),
}
TEACHER_RANKS = {  # the last pipeline stage (and hldc's hint stage); rank order: TP fastest, then DP, then PP
    "reference": [0],
    "tp2": [0, 1],
    "pp2": [1],
    "dp2": [0, 1],
    "tp2_sequence_parallel": [0, 1],
    "reverse_reference": [0],
    "reverse_tp2_replicated_teacher": [0, 1],
    "hldc_reference": [0],
    "hldc_tp2_sequence_parallel": [0, 1],
    "hldc_pp2": [0, 1],
    "hldf_reference": [0],
    "hldf_tp2_sequence_parallel": [0, 1],
    "hldf_pp2": [0, 1],
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_token_dataset(tmp_path_factory.mktemp("kd_data") / "tokens", vocab=VOCAB)


def base_config(data, **sections) -> dict:
    cfg = tiny_config(data, model={"vocab_size": VOCAB}, optimizer={"clip_grad": 0.0}, **sections)
    cfg["data"]["eod_token_id"] = VOCAB - 1
    cfg["teacher"] = {"model": TEACHERS["A"]}
    return cfg


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    root = tmp_path_factory.mktemp("kd")
    base = write_config(root / "base.yaml", base_config(data))
    torchrun(1, "-m megatron_let.train", "--config", str(base), "--set", "method=nll", "--set",
             "training.train_iters=0", "--set", f"checkpoint.save={root / 'init'}")  # fmt: skip
    for name, model in TEACHERS.items():  # two small "pretrained" teachers, trained by the trainer
        cfg = base_config(data, training={"train_iters": 2}, checkpoint={"save": str(root / f"teacher{name}")})
        cfg["model"], cfg["teacher"] = model, None
        torchrun(1, "-m megatron_let.train", "--config", str(write_config(root / f"teacher{name}.yaml", cfg)))

    metrics = {}
    for name, (nproc, which, method, layout, _) in STEPS.items():
        args = ["--config", str(base), "--out", str(root / name), "--set", f"checkpoint.load={root / 'init'}"]
        for item in [f"teacher.load={root / f'teacher{which}'}", f"teacher.model={json.dumps(TEACHERS[which])}"]:
            args += ["--set", item]
        for item in method + layout:
            args += ["--set", item]
        torchrun(nproc, "tests/harness/one_step.py", *args)
        metrics[name] = json.loads((root / name / "metrics.json").read_text())

    grads = {}
    for reference, which, method in (
        ("reference", "A", KD),
        ("reverse_reference", "B", REVERSE),
        ("hldc_reference", "A", HLDC),
        ("hldf_reference", "A", HLDF),
    ):
        dumps = [
            str(root / name / "grads") for name, step in STEPS.items() if name == reference or step[4] == reference
        ]
        sets = [f"checkpoint.load={root / 'init'}", f"teacher.load={root / f'teacher{which}'}"]
        sets += [f"teacher.model={json.dumps(TEACHERS[which])}", *method]
        args = ["--config", str(base), "--out", str(root / f"{reference}.pt"), "--direct-kd"]
        for item in sets:
            args += ["--set", item]
        torchrun(1, "tests/harness/read_grads.py", *args, *dumps)
        loaded = torch.load(root / f"{reference}.pt")
        grads[f"{reference}_direct"] = loaded["direct"]
        for dump in dumps:
            grads[dump.split("/")[-2]] = loaded[dump]
    return metrics, grads


def max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp(min=1e-12)) for n in a)


@pytest.mark.parametrize("name", [n for n, step in STEPS.items() if step[4] and not n.startswith("hldf")])
def test_a_distillation_step_under_tp_pp_dp_equals_the_single_process_step(runs, name):
    metrics, grads = runs
    reference = STEPS[name][4]
    ours, ref = metrics[name], metrics[reference]
    assert ours["lm_loss"] == pytest.approx(ref["lm_loss"], rel=LOSS_RTOL)
    assert ours["kd_loss"] == pytest.approx(ref["kd_loss"], rel=LOSS_RTOL, abs=KL_ATOL)
    assert ours["kd_loss"] > 1e-3 and ours["lambda"] == ref["lambda"] > 0  # the KL term is really there
    if name.startswith("hldc"):
        assert ours["hint_loss"] == pytest.approx(ref["hint_loss"], rel=LOSS_RTOL)
        assert ours["hint_loss"] > 1e-3
    difference = max_relative_difference(grads[name], grads[reference])
    print(
        f"\n{name}: lm loss {ours['lm_loss']:.6f}, kd loss {ours['kd_loss']:.6f}, gradient difference {difference:.2e}"
    )
    assert difference < GRAD_RTOL


@pytest.mark.parametrize("name", [n for n, step in STEPS.items() if step[4] and n.startswith("hldf")])
def test_an_hldf_phase1_step_under_tp_sp_and_pp_equals_the_single_process_step(runs, name):
    metrics, grads = runs
    ours, ref = metrics[name], metrics["hldf_reference"]
    assert ours["lm_loss"] is None and ours["kd_loss"] is None  # neither is computed in phase 1
    assert ours["hint_loss"] == pytest.approx(ref["hint_loss"], rel=LOSS_RTOL) and ours["hint_loss"] > 1e-3
    difference = max_relative_difference(grads[name], grads["hldf_reference"])
    print(f"\n{name}: hint loss {ours['hint_loss']:.6f}, gradient difference {difference:.2e}")
    assert difference < GRAD_RTOL


def test_hldf_phase1_trains_the_first_half_and_the_regressor_only(runs):
    _, grads = runs
    for name, grad in grads["hldf_reference"].items():
        later = any(f"decoder.layers.{i}." in name for i in (2, 3)) or "final_layernorm" in name
        if later:
            assert not grad.any(), name  # not run: no gradient at all
        elif name.startswith(("decoder.layers.0.", "decoder.layers.1.", "hint_regressor.")):
            assert grad.abs().max() > 0, name


@pytest.mark.parametrize("reference", ["reference", "reverse_reference", "hldc_reference", "hldf_reference"])
def test_the_single_process_step_equals_plain_autograd(runs, reference):
    _, grads = runs
    difference = max_relative_difference(grads[reference], grads[f"{reference}_direct"])
    print(f"\n{reference} vs plain autograd: max relative gradient difference {difference:.2e}")
    assert difference < GRAD_RTOL


@pytest.mark.parametrize("name", list(STEPS))
def test_the_teacher_lives_only_where_its_outputs_are_needed(runs, name):
    metrics, _ = runs
    assert metrics[name]["teacher_ranks"] == TEACHER_RANKS[name]


def records(path):
    return [json.loads(line) for line in path.read_text().splitlines() if "split" not in line]


def stopped_and_resumed(tmp_path, cfg: dict, layouts: list, every: int = 2, processes: int = 2) -> list:
    """The run of ``cfg`` stopped every ``every`` iterations (exit_interval) and resumed, one
    launch per entry of ``layouts`` (its --set overrides); its metric records."""
    resumed = tmp_path / "resumed"
    split = {**cfg, "checkpoint": {"save": str(resumed), "load": str(resumed)}}
    split["training"] = {**cfg["training"], "exit_interval": every}
    path = write_config(tmp_path / "split.yaml", split)
    for layout in layouts:
        sets = [item for setting in layout for item in ("--set", setting)]
        torchrun(processes, "-m megatron_let.train", "--config", str(path), *sets)
    return records(resumed / "metrics.jsonl")


def assert_same_records(done: list, again: list, keys: tuple, rel: float) -> None:
    assert [r["iteration"] for r in again] == [r["iteration"] for r in done]
    for a, b in zip(done, again):
        for key in (k for k in keys if k in a):
            assert (b[key] is None) == (a[key] is None), (key, a["iteration"])
            if a[key] is not None:
                assert b[key] == pytest.approx(a[key], rel=rel), (key, a["iteration"])


RESUMED = {
    # method: (method config, layout); both release the teacher at step 3 of 6
    "salt": ({"distillation": {"alpha": 0.5, "temperature": 1.0, "top_k": 8, "stop_step": 3}}, "pp2"),
    "hldc": (
        {"distillation": {"alpha": 0.5, "top_k": 8, "stop_step": 3}, "hld": {"gamma": 1.0}},
        "pp2",
    ),
}


@pytest.mark.parametrize("method", list(RESUMED))
def test_the_teacher_leaves_at_stop_step_and_a_resumed_run_continues_identically(tmp_path, data, method):
    """At PP 2: distillation for 3 steps, then NLL with the teacher released (hldc's W_R stays in
    the model and its checkpoint); once straight through 6 steps, once stopped at step 2
    (exit_interval, with the teacher) and resumed, stopped at 4 (past the switch) and resumed."""
    sections, _ = RESUMED[method]
    cfg = base_config(
        data,
        method=method,
        training={"train_iters": 6},
        parallel={"pipeline_model_parallel_size": 2},
        **sections,
    )
    straight = write_config(tmp_path / "straight.yaml", {**cfg, "checkpoint": {"save": str(tmp_path / "straight")}})
    out = torchrun(2, "-m megatron_let.train", "--config", str(straight)).stdout
    assert f"{method}: (1 − 0.5)·NLL + 0.5·τ²·KL(p_T‖p_S), τ 1.0, teacher top-8 renormalised, until step 3" in out
    assert "iteration 4: distillation ends (distillation.stop_step=3)" in out
    done = records(tmp_path / "straight" / "metrics.jsonl")
    assert [r["lambda"] for r in done] == [0.5, 0.5, 0.5, 0.0, 0.0, 0.0]
    assert all(r["kd_loss"] > 0 for r in done[:3]) and all(r["kd_loss"] is None for r in done[3:])
    assert "kd loss" in out and "α 0.5" in out
    if method == "hldc":
        assert all(r["hint_loss"] > 0 for r in done[:3]) and all(r["hint_loss"] is None for r in done[3:])

    again = stopped_and_resumed(tmp_path, cfg, layouts=[[]] * 3)
    assert_same_records(done, again, ("lm_loss", "kd_loss", "hint_loss"), rel=1e-6)


def test_hldf_switches_phase_at_its_step_and_resumes_identically(tmp_path, data):
    """HLDF at PP 2 (the hint layer on stage 0): phase 1 for 3 iterations (lr warmed up over 2,
    then constant; layers 3–4 frozen), then KD with the lr warmed up again over 2 and decayed;
    once straight through 6 iterations, once stopped every 2 (exit_interval) and resumed. After
    phase 1's iterations the later layers are exactly their initial values, the first ones not."""
    cfg = base_config(
        data,
        method="hldf",
        hld={"phase1_iters": 3, "phase1_warmup_iters": 2},
        distillation={"alpha": 0.5, "top_k": 8},
        training={"train_iters": 6},
        parallel={"pipeline_model_parallel_size": 2},
    )
    cfg["optimizer"].update(lr=1e-3, lr_warmup_fraction=0.5)
    straight = write_config(tmp_path / "straight.yaml", {**cfg, "checkpoint": {"save": str(tmp_path / "straight")}})
    out = torchrun(2, "-m megatron_let.train", "--config", str(straight)).stdout
    assert "hldf: phase 1 (iterations 1–3): student layers 1–2 + MLP regressor (64→256→48)" in out
    assert "iteration 4: HLDF phase 2: KD over the whole student, lr warmed up again" in out
    done = records(tmp_path / "straight" / "metrics.jsonl")
    lrs = [r["lr"] / 1e-3 for r in done]
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.5, 1.0, 0.1])  # min_lr = 0.1 × lr at the end of the decay
    assert all(r["lm_loss"] is None and r["kd_loss"] is None and r["hint_loss"] > 0 for r in done[:3])
    assert all(r["lm_loss"] > 0 and r["kd_loss"] > 0 and r["hint_loss"] is None for r in done[3:])

    again = stopped_and_resumed(tmp_path, cfg, layouts=[[]] * 3)
    assert_same_records(done, again, ("lm_loss", "kd_loss", "hint_loss", "lr"), rel=1e-6)
    resumed = tmp_path / "resumed"

    # The weights after 2 phase-1 iterations, read back at TP = PP = 1, against the initial ones.
    single = write_config(tmp_path / "single.yaml", {**cfg, "parallel": {}})
    dumps = [str(resumed / "iter_0000002"), str(resumed / "iter_0000006")]
    args = ["--config", str(single), "--out", str(tmp_path / "w.pt"), "--initial"]
    torchrun(1, "tests/harness/read_grads.py", *args, *dumps)
    weights = torch.load(tmp_path / "w.pt")  # the initial weights: the same for every layout (seeded by name)
    initial, phase1, final = weights["initial"], weights[dumps[0]], weights[dumps[1]]
    for name in initial:
        if any(f"decoder.layers.{i}." in name for i in (2, 3)) or "final_layernorm" in name:
            assert torch.equal(initial[name], phase1[name]), name  # frozen: not even weight decay
            if "weight" in name:
                assert not torch.equal(initial[name], final[name]), name  # trained in phase 2
        elif name.startswith(("decoder.layers.0.", "decoder.layers.1.", "hint_regressor.")) and "weight" in name:
            assert not torch.equal(initial[name], phase1[name]), name


PP2 = ["parallel.pipeline_model_parallel_size=2"]
DP2: list = []  # two processes, no model parallelism
RESHARDED = {
    # method: (method config, the layouts of iterations 1, 2 and 3, each launch saved and resumed by the next)
    "let": ({"alignment": {"lambda0": 0.5}}, [TP2_SP, PP2, DP2]),
    "kd": ({"distillation": {"alpha": 0.5, "top_k": 16}}, [PP2, DP2, TP2_SP]),
    "hldc": ({"distillation": {"top_k": 16}, "hld": {"gamma": 1.0}}, [TP2_SP, DP2, PP2]),
    "hldf": ({"distillation": {"top_k": 16}, "hld": {"phase1_iters": 2}}, [PP2, TP2_SP, DP2]),
    # reverse KL over the whole vocabulary; SALT switches to NLL (teacher released) at the last resume
    "rkd": ({"distillation": {"alpha": 0.4, "temperature": 1.5, "top_k": None, "reverse": True}}, [DP2, PP2, TP2_SP]),
    "salt": ({"distillation": {"alpha": 0.5, "top_k": 8, "stop_step": 2}}, [TP2_SP, PP2, DP2]),
}


@pytest.mark.parametrize("method", list(RESHARDED))
def test_each_method_resumes_under_tp_pp_and_dp_identically(tmp_path, data, method):
    """Each iteration under another layout — TP 2 with sequence parallelism, PP 2, DP 2 — stopped
    and resumed from the previous one's checkpoint: the model, the optimizer state and the
    objective's own parameters (hldc's W_R on the hint layer's stage, replicated over TP; hldf's
    MLP) reshard, and the losses equal a straight single-process run's. hldf crosses its phase
    boundary and salt its switch to NLL at the last resume."""
    sections, layouts = RESHARDED[method]
    cfg = base_config(data, method=method, training={"train_iters": 3}, **sections)
    straight = write_config(tmp_path / "straight.yaml", {**cfg, "checkpoint": {"save": str(tmp_path / "straight")}})
    torchrun(1, "-m megatron_let.train", "--config", str(straight))
    again = stopped_and_resumed(tmp_path, cfg, layouts=layouts, every=1)
    done = records(tmp_path / "straight" / "metrics.jsonl")
    assert_same_records(done, again, ("lm_loss", "kd_loss", "hint_loss", "alignment_loss"), rel=1e-5)
