"""GPU checks: Transformer Engine layers and fused kernels, BF16 gradients, TP/PP over NCCL,
the distributed optimizer's checkpoint round trip, teacher release and activation recompute.

Every test launches the real trainer (or a harness script around it) under torchrun with
``device: cuda`` — NCCL, BF16, Transformer Engine — as the CPU tests do with gloo. They skip, saying
why, on a machine with fewer CUDA GPUs than they need (CI is CPU-only); run them with
``pytest tests/test_gpu.py -s`` (``-s`` prints the measured differences). One GPU runs the
single-GPU tests in a few minutes; the TP2 / PP2 / DP2 tests need two.

Tolerances (BF16 has an 8-bit significand: one rounding is a relative error ≤ 2^-9 ≈ 2e-3):

* same layout, same kernels (PP2 vs one GPU, recompute on vs off): the forward passes run the
  same kernels on the same BF16 inputs (pipeline sends copy activations exactly), so the losses
  agree to 1e-5 (the alignment loss to 1e-6 absolute); gradients are held to 2e-2 of each tensor's largest entry, although they should
  agree far better, to leave room for reductions whose order is not fixed.
* trainer vs plain autograd (one GPU): the forward is the same, but megatron accumulates weight
  gradients over the M = 4 microbatches in fp32 (main_grad) while autograd sums BF16 gradients,
  and the dump rounds main_grad to BF16: about M + 2 roundings of ≤ 2e-3 → 2e-2.
* TP2 vs one GPU: each row-parallel layer's output is the BF16 sum of two partial GEMMs instead
  of one GEMM, a rounding difference of ~2^-9 per layer that compounds through 4 layers forward and
  backward: gradients to 5e-2, the LM loss to 1e-3 relative. The alignment loss is a mean of
  per-token cosines near 0 for a random teacher (|loss| ~ 1e-4–3e-3): a relative error δ ~ 1e-2 of
  the hidden state moves one cosine by ~δ/√d_T ≈ 1e-3 with a random sign, their mean over 2048
  tokens by ~3e-5, hence 2e-4 absolute.
* λ0 = 1: the alignment term then moves every gradient of layers ≤ k by ≥ 2 × the widest gradient
  tolerance (asserted in test_bf16_step_equals_direct_autograd): a step that lost or doubled the
  alignment gradient fails every gradient comparison here. On the CPU in fp32 with this model,
  λ0 = 0.1 moves them by 5–12 %.
"""

import importlib.util
import json
import math

import pytest
import torch

from conftest import tiny_config, torchrun, write_config

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA GPU"),
    pytest.mark.skipif(
        importlib.util.find_spec("transformer_engine") is None,
        reason="needs Transformer Engine (pip install -e '.[gpu]')",
    ),
]
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")

# Megatron's non-TE output layer fuses its weight gradient only with apex's extension: the other
# tests ask for the fusion exactly where it can build (test_te_layers_and_fused_kernels checks
# the trainer's own default).
WGRAD_FUSION = importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None
# Deterministic TE attention backends; megatron's TP overlap expects one CUDA connection (as Megatron-LM's scripts).
GPU_ENV = {"NVTE_ALLOW_NONDETERMINISTIC_ALGO": "0", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}

LAMBDA0 = 1.0
GRAD_RTOL = {"same_kernels": 2e-2, "direct": 2e-2, "tp": 5e-2}
LOSS_RTOL = {"same_kernels": 1e-5, "direct": 1e-5, "tp": 1e-3}
ALIGN_ATOL = {"same_kernels": 1e-6, "direct": 1e-6, "tp": 2e-4}

TARGET = {
    "num_layers": 4,
    "hidden_size": 128,
    "num_attention_heads": 4,
    "num_query_groups": 2,
    "ffn_hidden_size": 256,
    "max_position_embeddings": 64,
}
# Heads of 48 and 32 channels (TE's fused attention wants multiples of 8); 2 teacher heads and an
# FFN of 192 split over TP2, so the teacher is tensor-parallel there.
TEACHER = {
    "num_layers": 2,
    "hidden_size": 96,
    "num_attention_heads": 2,
    "num_query_groups": None,
    "ffn_hidden_size": 192,
    "max_position_embeddings": 64,
    "normalization": "RMSNorm",
    "activation": "swiglu",
}
# For the memory tests: a teacher whose BF16 weights (11.0 M parameters, 22 MB) stand out.
BIG_TEACHER = dict(TEACHER, num_layers=4, hidden_size=512, num_attention_heads=8, ffn_hidden_size=1024)


def launch(nproc: int, script: str, *args: str):
    return torchrun(nproc, script, *args, timeout=600, env=GPU_ENV)


def gpu_config(token_data, teacher_model=None, **sections) -> dict:
    """tiny_config on the GPU: BF16, Transformer Engine, 4 microbatches of 2 × 64 tokens."""
    cfg = tiny_config(token_data)
    cfg["device"] = "cuda"
    cfg["model"].update(TARGET)
    cfg["teacher"]["model"].update(teacher_model or TEACHER)
    cfg["alignment"]["lambda0"] = LAMBDA0
    cfg["training"].update({"precision": "bf16", "seq_length": 64, "gradient_accumulation_fusion": WGRAD_FUSION})
    cfg["optimizer"]["clip_grad"] = 0.0  # clipping would scale main_grad in place, i.e. the dumped gradients
    for section, values in sections.items():
        if isinstance(values, dict):
            cfg.setdefault(section, {}).update(values)
        else:
            cfg[section] = values
    return cfg


def read_jsonl(path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def max_relative_difference(a: dict, b: dict, names=None) -> float:
    """max over tensors of max |a − b| / max |b| (fp32 on the CPU)."""
    assert a.keys() == b.keys()
    return max(relative_differences(a, b, names).values())


def relative_differences(a: dict, b: dict, names=None) -> dict:
    return {n: float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp(min=1e-30)) for n in (names or a)}


def layers_up_to(grads: dict, k: int) -> list:
    """Parameters the alignment loss of layer k reaches: the embedding and layers 1..k."""
    return [
        n for n in grads if n.startswith("embedding.") or (n.startswith("decoder.layers.") and int(n.split(".")[2]) < k)
    ]


def assert_close(ours: dict, ref: dict, kind: str, what: str) -> None:
    assert ours["lm_loss"] == pytest.approx(ref["lm_loss"], rel=LOSS_RTOL[kind]), what
    assert ours["alignment_loss"] is not None and ref["alignment_loss"] is not None, what
    assert ours["alignment_loss"] == pytest.approx(ref["alignment_loss"], abs=ALIGN_ATOL[kind]), what


class Runs:
    """One-step runs from a shared initial checkpoint, each launched once (memoised)."""

    def __init__(self, root, token_data):
        self.root = root
        self.base = write_config(root / "base.yaml", gpu_config(token_data))
        self.init = None
        self.metrics = {}
        self.read = {}

    def init_checkpoint(self):
        """The initial BF16 model, written by the trainer (every run below loads it, so the
        comparisons do not rest on layout-independent initialisation)."""
        if self.init is None:
            launch(
                1,
                "-m megatron_let.train",
                "--config",
                str(self.base),
                "--set",
                "training.train_iters=0",
                "--set",
                f"checkpoint.save={self.root / 'init'}",
            )
            self.init = self.root / "init"
        return self.init

    def step(self, name: str, nproc: int, layer: int, overrides=()) -> dict:
        if name not in self.metrics:
            args = [
                "--config",
                str(self.base),
                "--out",
                str(self.root / name),
                "--set",
                f"checkpoint.load={self.init_checkpoint()}",
                "--set",
                f"alignment.target_layer={layer}",
            ]
            for item in overrides:
                args += ["--set", item]
            launch(nproc, "tests/harness/gpu_one_step.py", *args)
            self.metrics[name] = json.loads((self.root / name / "metrics.json").read_text())
        return self.metrics[name]

    def gradients(self, names, direct_layer=None) -> dict:
        """The named runs' gradients at TP=PP=1 (and with ``direct_layer`` the plain-autograd
        reference for k = direct_layer), read in one process."""
        key = (tuple(names), direct_layer)
        if key not in self.read:
            out = self.root / f"grads{len(self.read)}.pt"
            args = [
                "--config",
                str(self.base),
                "--out",
                str(out),
                "--set",
                f"checkpoint.load={self.init_checkpoint()}",
                "--set",
                "training.gradient_accumulation_fusion=false",
            ]
            if direct_layer is not None:
                args += ["--set", f"alignment.target_layer={direct_layer}", "--direct"]
            launch(1, "tests/harness/gpu_grads.py", *args, *[str(self.root / n / "grads") for n in names])
            loaded = torch.load(out, map_location="cpu")
            result = {n: loaded[str(self.root / n / "grads")] for n in names}
            for extra in ("direct", "direct_no_alignment", "direct_losses"):
                if extra in loaded:
                    result[extra] = loaded[extra]
            self.read[key] = result
        return self.read[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, token_data):
    return Runs(tmp_path_factory.mktemp("gpu_runs"), token_data)


# ------------------------------------------------------------------------------------------ 1 GPU


def test_te_layers_and_fused_kernels(tmp_path, token_data):
    """device: cuda with the default transformer_impl (auto) builds Transformer Engine modules in
    every layer of target and teacher, turns on megatron's fused kernels, and the fused
    weight-gradient GEMMs really write into main_grad during a step."""
    cfg = gpu_config(token_data)
    del cfg["training"]["gradient_accumulation_fusion"]  # the trainer's own default
    path = write_config(tmp_path / "run.yaml", cfg)
    launch(1, "tests/harness/gpu_inspect.py", "--config", str(path), "--out", str(tmp_path / "report.json"))
    report = json.loads((tmp_path / "report.json").read_text())
    print("\n" + json.dumps({k: report[k] for k in ("kernels", "apex_wgrad_extension", "step")}, indent=1))

    assert report["use_te"] and report["precision"] == "bf16"
    assert report["wrapper"].endswith("Float16Module") and report["param_dtypes"] == ["torch.bfloat16"]
    for model in ("target", "teacher"):
        assert len(report[model]["layers"]) == {"target": TARGET, "teacher": TEACHER}[model]["num_layers"]
        for index, layer in enumerate(report[model]["layers"]):
            for path, module in layer.items():
                assert module["is_te"], f"{model} layer {index + 1} {path} is {module['class']}"
        assert report[model]["final_layernorm"].startswith("transformer_engine."), report[model]["final_layernorm"]
    assert report["teacher_param_dtypes"] == ["torch.bfloat16"]

    kernels = report["kernels"]
    assert kernels["bias_activation_fusion"], "SwiGLU fusion off"
    assert kernels["apply_rope_fusion"], "RoPE fusion off"
    assert kernels["cross_entropy_loss_fusion"], "cross-entropy fusion off"
    assert kernels["bias_dropout_fusion"]
    # On wherever it can build: TE's GEMMs always can, megatron's output layer needs apex's extension.
    assert kernels["gradient_accumulation_fusion"] == report["apex_wgrad_extension"]
    assert report["teacher_kernels"]["bias_activation_fusion"] and report["teacher_kernels"]["apply_rope_fusion"]
    for layer in report["target"]["layers"]:
        for path in ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2"):
            assert layer[path]["fuse_wgrad_accumulation"] == kernels["gradient_accumulation_fusion"], path
    fused = report["grad_added_to_main_grad"]
    assert fused and all(flag == kernels["gradient_accumulation_fusion"] for flag in fused.values()), fused
    assert report["main_grad_nonzero"]

    step = report["step"]
    assert step["finite"] and step["alignment_loss"] is not None and step["lambda"] == LAMBDA0
    assert (
        step["peak_memory_allocated_gib"] > 0 and step["peak_memory_reserved_gib"] >= step["peak_memory_allocated_gib"]
    )


def test_bf16_step_equals_direct_autograd(runs):
    """One BF16 step of the trainer (hook, aux-loss scaler, megatron's schedule, fused kernels) has
    the gradients of plain autograd of Σ_m (LM_m + λ·L_align,m) / M on the same GPU."""
    metrics = runs.step("ref_k3", 1, 3)
    read = runs.gradients(["ref_k3"], direct_layer=3)
    ours, direct, without = read["ref_k3"], read["direct"], read["direct_no_alignment"]
    difference = max_relative_difference(ours, direct)
    print(
        f"\nBF16 trainer vs direct autograd: max relative gradient difference {difference:.2e}; "
        f"losses {metrics['lm_loss']!r} / {metrics['alignment_loss']!r} vs {read['direct_losses']}"
    )

    assert metrics["lambda"] == LAMBDA0 and metrics["params_dtype"] == "torch.bfloat16" and metrics["use_te"]
    assert_close(metrics, read["direct_losses"], "direct", "trainer vs direct")
    assert difference < GRAD_RTOL["direct"]

    # The comparison can see the alignment term: it moves each gradient of layers ≤ k by more than
    # twice the widest gradient tolerance of this file, and leaves those after k alone.
    reach = layers_up_to(direct, 3)
    moved = relative_differences(direct, without, reach)
    print(
        f"alignment share of the gradients of layers ≤ k: min {min(moved.values()):.2e}, max {max(moved.values()):.2e}"
    )
    assert min(moved.values()) > 2 * max(GRAD_RTOL.values()), moved
    # (the same computation: exactly equal with deterministic kernels; 1e-3 allows for a reordered sum)
    untouched = [n for n in direct if n not in reach]
    assert untouched and max_relative_difference(direct, without, untouched) < 1e-3


def test_teacher_release_frees_its_memory(tmp_path, token_data):
    """torch.cuda.memory_allocated() drops by at least the teacher's BF16 weights (2 bytes × its
    parameter count) when a Teacher is released, and when the trainer releases its own at S_stop."""
    path = write_config(tmp_path / "run.yaml", gpu_config(token_data, teacher_model=BIG_TEACHER))
    launch(1, "tests/harness/gpu_release.py", "--config", str(path), "--out", str(tmp_path / "report.json"))
    report = json.loads((tmp_path / "report.json").read_text())
    for case in ("standalone", "trainer"):
        r = report[case]
        weights = 2 * r["numel"]
        freed = r["before_release"] - r["after_release"]
        print(
            f"\n{case}: {r['numel']} teacher parameters = {weights / 2**20:.1f} MiB in BF16; "
            f"memory_allocated dropped by {freed / 2**20:.1f} MiB"
        )
        assert r["dtypes"] == ["torch.bfloat16"] and r["devices"] == ["cuda"]
        assert r["numel"] > 10_000_000
        assert freed >= weights, r
        assert r["model_collected"], f"{case}: something still references the teacher's model"
    assert (
        report["standalone"]["before_release"] - report["standalone"]["before_build"]
        >= 2 * report["standalone"]["numel"]
    )
    assert not report["standalone"]["has_model_attribute"]
    trainer = report["trainer"]
    assert trainer["teacher_is_none"] and trainer["hook_is_none"]
    assert trainer["first_step_alignment_loss"] is not None
    assert trainer["second_step_alignment_loss"] is None and math.isfinite(trainer["second_step_lm_loss"])
    # The next step does not bring it back (half: the step may cache a few blocks of its own).
    assert trainer["after_second_step"] <= trainer["before_release"] - trainer["numel"]


def test_let_run_releases_teacher_and_memory_at_s_stop(tmp_path, token_data):
    """A real LET run of 24 steps with S_stop = 12 (BF16, TE): alignment loss logged up to S_stop
    and None after, peak memory allocated/reserved logged every step, and the peak allocated after
    the release lower than during alignment by about the teacher's weights."""
    from megatron_let.alignment import alignment_weight
    from megatron_let.config import ModelConfig
    from megatron_let.model.gpt import count_parameters

    train_iters, stop = 24, 12
    path = write_config(
        tmp_path / "run.yaml",
        gpu_config(
            token_data,
            teacher_model=BIG_TEACHER,
            training={"train_iters": train_iters},
            alignment={"stop_step": stop},
            optimizer={"clip_grad": 1.0},
            logging={"log_interval": 1, "jsonl_path": str(tmp_path / "metrics.jsonl")},
        ),
    )
    out = launch(1, "-m megatron_let.train", "--config", str(path))
    assert "Transformer Engine layers" in out.stdout
    assert out.stdout.count("teacher released") == 1
    records = [r for r in read_jsonl(tmp_path / "metrics.jsonl") if "split" not in r]
    assert [r["iteration"] for r in records] == list(range(1, train_iters + 1))
    for r in records:
        assert r["lambda"] == pytest.approx(alignment_weight(r["iteration"] - 1, LAMBDA0, stop), abs=1e-12)
        assert (r["alignment_loss"] is not None) == (r["iteration"] <= stop), r
        assert math.isfinite(r["lm_loss"]) and math.isfinite(r["grad_norm"]) and not r["skipped"]
        assert 0 < r["peak_memory_allocated_gib"] <= r["peak_memory_reserved_gib"], r
    # Iteration 1 includes start-up, iteration stop + 1 the release itself: both left out.
    during = [r["peak_memory_allocated_gib"] for r in records[1:stop]]
    after = [r["peak_memory_allocated_gib"] for r in records[stop + 1 :]]
    teacher_gib = 2 * count_parameters(ModelConfig(**{**BIG_TEACHER, "vocab_size": 512}))["total"] / 2**30
    print(
        f"\npeak allocated during alignment {min(during):.4f}–{max(during):.4f} GiB, after S_stop "
        f"{min(after):.4f}–{max(after):.4f} GiB; teacher weights {teacher_gib:.4f} GiB"
    )
    assert max(after) < min(during)
    # The teacher's weights are resident through every alignment step and gone after; the caching
    # allocator may round a few blocks differently, hence half.
    assert min(during) - max(after) >= 0.5 * teacher_gib


# ------------------------------------------------------------------------------------------ 2 GPUs

# name: (processes, k, overrides, reference run, tolerance kind, expected teacher ranks)
PP2 = ["parallel.pipeline_model_parallel_size=2"]
RECOMPUTE = [
    "parallel.recompute_granularity=full",
    "parallel.recompute_method=uniform",
    "parallel.recompute_num_layers=1",
]
LAYOUTS = {
    "tp2": (2, 3, ["parallel.tensor_model_parallel_size=2"], "ref_k3", "tp", [0, 1]),
    "pp2_k_on_stage1": (2, 3, PP2, "ref_k3", "same_kernels", [1]),
    # k = 2 is the last layer of stage 0: the hook's output is the stage output, which megatron
    # frees once sent (deallocate_pipeline_outputs) — it must not be a view.
    "pp2_k_at_stage_boundary": (2, 2, PP2, "ref_k2", "same_kernels", [0]),
}
# Full recompute, one layer at a time: layer k first runs without a graph, then again in the
# backward; the alignment loss must be attached exactly once. Compared with the same layout without it.
RECOMPUTE_LAYOUTS = {
    "pp2_recompute_k_on_stage0": (2, 2, PP2 + RECOMPUTE, "pp2_k_at_stage_boundary", "same_kernels", [0]),
    "pp2_recompute_k_on_stage1": (2, 3, PP2 + RECOMPUTE, "pp2_k_on_stage1", "same_kernels", [1]),
}


@pytest.fixture(scope="module")
def two_gpu_runs(runs):
    """Every 2-GPU one-step run and its references, gradients read back in one process."""
    runs.step("ref_k3", 1, 3)
    runs.step("ref_k2", 1, 2)
    for name, (nproc, layer, overrides, *_) in {**LAYOUTS, **RECOMPUTE_LAYOUTS}.items():
        runs.step(name, nproc, layer, overrides)
    return runs.metrics, runs.gradients(sorted(runs.metrics))


def check_layout(two_gpu_runs, name: str, spec: tuple) -> None:
    metrics, grads = two_gpu_runs
    _, layer, _, reference, kind, teacher_ranks = spec
    ours, ref = metrics[name], metrics[reference]
    difference = max_relative_difference(grads[name], grads[reference])
    print(
        f"\n{name} vs {reference}: lm loss {ours['lm_loss']!r} vs {ref['lm_loss']!r}, alignment loss "
        f"{ours['alignment_loss']!r} vs {ref['alignment_loss']!r}, max relative gradient difference {difference:.2e}"
    )
    assert ours["teacher_ranks"] == teacher_ranks
    assert ours["owner_stage"][0] == (teacher_ranks[0] if ours["pipeline_model_parallel_size"] > 1 else 0)
    assert ours["deallocate_pipeline_outputs"] is True
    assert ours["lambda"] == ref["lambda"] == LAMBDA0
    assert_close(ours, ref, kind, name)
    assert difference < GRAD_RTOL[kind]


@two_gpus
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_bf16_layouts_match_single_gpu(two_gpu_runs, name):
    """TP2 and PP2 (k inside stage 1, and k the last layer of stage 0) over NCCL in BF16: the
    one-GPU step's losses and gradients."""
    metrics, _ = two_gpu_runs
    tp = 2 if name.startswith("tp2") else 1
    assert (metrics[name]["tensor_model_parallel_size"], metrics[name]["pipeline_model_parallel_size"]) == (tp, 2 // tp)
    assert metrics[name]["recompute_granularity"] is None
    check_layout(two_gpu_runs, name, LAYOUTS[name])


@two_gpus
@pytest.mark.parametrize("name", list(RECOMPUTE_LAYOUTS))
def test_full_recompute_matches_no_recompute(two_gpu_runs, name):
    """PP2 with full activation recompute (uniform, 1 layer) and k on stage 0 / stage 1 gives the
    losses and gradients of the same layout without recompute."""
    metrics, _ = two_gpu_runs
    ours = metrics[name]
    assert (ours["recompute_granularity"], ours["recompute_method"], ours["recompute_num_layers"]) == (
        "full",
        "uniform",
        1,
    )
    assert ours["pipeline_model_parallel_size"] == 2
    assert metrics[RECOMPUTE_LAYOUTS[name][3]]["recompute_granularity"] is None
    check_layout(two_gpu_runs, name, RECOMPUTE_LAYOUTS[name])


@two_gpus
def test_distributed_optimizer_checkpoint_round_trip(tmp_path, token_data):
    """DP2 with the distributed optimizer (and its overlapped gradient reduce / parameter gather):
    8 steps saving at 4, then a fresh run resuming from iteration 4 (teacher rebuilt, S_stop = 6
    crossed after the restart) logs the same iterations 5–8 as the uninterrupted run.

    Iteration 5's forward is a function of the restored state only (weights, data position) and
    runs deterministic kernels, so its losses must agree bit for bit. Later iterations also depend
    on the restored optimizer state (fp32 master weights, Adam moments, step count) and on the BF16
    backward: 2e-5 relative leaves room for reduction order, while an optimizer state that was not
    restored changes the update at lr 5e-3, and the loss after it, far more."""
    from megatron.core import dist_checkpointing

    common = dict(
        training={"train_iters": 8},
        alignment={"stop_step": 6},
        optimizer={"lr": 5e-3, "clip_grad": 1.0},
        parallel={"use_distributed_optimizer": True},
        logging={"log_interval": 1},
        checkpoint={"save_interval": 4},
    )
    straight = write_config(tmp_path / "straight.yaml", gpu_config(token_data, **common))
    launch(2, "-m megatron_let.train", "--config", str(straight), "--set", f"checkpoint.save={tmp_path / 'a'}")
    middle = tmp_path / "a" / "iter_0000004"
    out = launch(
        2,
        "-m megatron_let.train",
        "--config",
        str(straight),
        "--set",
        f"checkpoint.load={middle}",
        "--set",
        f"checkpoint.save={tmp_path / 'b'}",
    )
    assert "at iteration 4" in out.stdout and "teacher released" in out.stdout

    def contains(obj, key):
        if isinstance(obj, dict):
            return key in obj or any(contains(v, key) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return any(contains(v, key) for v in obj)
        return False

    saved = dist_checkpointing.load_common_state_dict(str(middle))
    assert contains(saved.get("optimizer"), "param_state_sharding_type"), "no distributed-optimizer state saved"

    a = {r["iteration"]: r for r in read_jsonl(tmp_path / "a" / "metrics.jsonl") if "split" not in r}
    b = {r["iteration"]: r for r in read_jsonl(tmp_path / "b" / "metrics.jsonl") if "split" not in r}
    assert sorted(a) == list(range(1, 9)) and sorted(b) == [5, 6, 7, 8]
    for it in range(5, 9):
        ra, rb = a[it], b[it]
        print(
            f"\niteration {it}: lm loss {ra['lm_loss']!r} / {rb['lm_loss']!r}, alignment "
            f"{ra['alignment_loss']!r} / {rb['alignment_loss']!r}, grad norm {ra['grad_norm']!r} / {rb['grad_norm']!r}"
        )
        assert (rb["lambda"], rb["consumed_samples"]) == (ra["lambda"], ra["consumed_samples"])
        assert rb["lr"] == pytest.approx(ra["lr"], rel=1e-12)  # the restored scheduler
        assert (ra["alignment_loss"] is None) == (rb["alignment_loss"] is None) == (it > 6)
        if it == 5:
            assert rb["lm_loss"] == ra["lm_loss"] and rb["alignment_loss"] == ra["alignment_loss"]
        else:
            assert rb["lm_loss"] == pytest.approx(ra["lm_loss"], rel=2e-5)
            if ra["alignment_loss"] is not None:
                assert rb["alignment_loss"] == pytest.approx(ra["alignment_loss"], rel=2e-5, abs=1e-7)
        assert rb["grad_norm"] == pytest.approx(ra["grad_norm"], rel=1e-3)
