"""``megatron-let plan`` against counts made another way: parameters and saved activations of the
models the trainer really builds (torchrun, CPU), Korthikanti et al.'s per-layer formulas and
Megatron-LM's weight/optimizer bytes written out by hand, the known teachers' architectures as
`convert` reads them from their published config.json, and the command line on every example."""

import contextlib
import io
import json
import shlex
import subprocess
import sys
from dataclasses import replace

import pytest
import yaml

from megatron_let.apps import plan
from megatron_let.config import ModelConfig
from megatron_let.model.gpt import count_parameters
from megatron_let.run_config import load_run_config as load_config

from conftest import REPO, RUN_EXAMPLES, torchrun, write_config

EXAMPLES = RUN_EXAMPLES


def run_plan(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = plan.main(list(args))
    return code, out.getvalue(), err.getvalue()


# ---------------------------------------------------------------------------------------------
# The real models, built by the trainer

MEASURED = {
    "device": "cpu",
    # MHA (local attention expands GQA's K/V), SwiGLU, RoPE, untied: the target's terms all appear.
    "model": {
        "num_layers": 4,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "ffn_hidden_size": 256,
        "vocab_size": 300,
        "max_position_embeddings": 64,
        "activation": "swiglu",
        "position_embedding_type": "rope",
    },
    # OPT-like: biases, LayerNorm, learned positions, tied head.
    "teacher": {
        "model": {
            "num_layers": 2,
            "hidden_size": 48,
            "num_attention_heads": 2,
            "ffn_hidden_size": 96,
            "vocab_size": 300,
            "max_position_embeddings": 64,
            "normalization": "LayerNorm",
            "activation": "relu",
            "add_bias_linear": True,
            "position_embedding_type": "learned_absolute",
            "untie_embeddings_and_output_weights": False,
        }
    },
    "alignment": {"target_layer": 3},
    "training": {"micro_batch_size": 3, "global_batch_size": 6, "seq_length": 32, "train_iters": 1},
    "data": {"mock_data": True},
    "eval": {"test_at_end": False},
}
LAYOUTS = {
    "dp2": [],
    "tp2": ["parallel.tensor_model_parallel_size=2"],
    "tp2_sp": ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"],
    "tp2_replicated_teacher": ["parallel.tensor_model_parallel_size=2", "teacher.model.num_attention_heads=3"],
    "pp2_tied": ["parallel.pipeline_model_parallel_size=2", "model.untie_embeddings_and_output_weights=false"],
}


def local_layer_extras(m: ModelConfig, seq: int, micro: int, tp: int, sp: bool) -> float:
    """What megatron's local (CPU) layers keep beyond what the estimate (Transformer Engine's path)
    counts, fp32: the local RMSNorm is decomposed, so besides its input and output it keeps x·rstd
    (e·sbh) and rstd (4 B per token), for each of the two norms; and the RoPE cos/sin tables, four
    s × kv FP32 tensors that do not grow with the batch."""
    tokens = seq * micro / (tp if sp else 1)
    kv = m.hidden_size // m.num_attention_heads
    return 2 * (4 * tokens * m.hidden_size + 4 * tokens) + 4 * seq * kv * 4


def test_parameters_and_saved_activations_match_the_built_models(tmp_path):
    base = write_config(tmp_path / "base.yaml", MEASURED)
    args = ["--config", str(base), "--out", str(tmp_path / "out")]
    for name, sets in LAYOUTS.items():
        args += ["--layout", f"{name}:{','.join(sets)}"]
    torchrun(2, str(REPO / "tests" / "harness" / "plan_params.py"), *args, timeout=600)
    for name, sets in LAYOUTS.items():
        cfg = load_config(base, sets)
        estimate = plan.estimate(cfg, 2)
        tp, sp = cfg.parallel.tensor_model_parallel_size, cfg.parallel.sequence_parallel
        # torch's CPU attention is its flash kernel: output and logsumexp kept, as TE's fused attention.
        per_layer = plan.layer_activation_bytes(
            cfg.model, 32, 3, tp, sp, attention=plan.ATTENTION_FUSED, element_size=4, fused_activation=False
        )
        per_layer += local_layer_extras(cfg.model, 32, 3, tp, sp)
        for rank in range(2):
            record = json.loads((tmp_path / "out" / name / f"rank{rank}.json").read_text())
            stage = record["pp_rank"]
            assert record["target"] == estimate.stages[stage].parameters["total"], (name, rank, record)
            if stage == estimate.teacher.owner_rank:
                assert record["teacher"] == estimate.teacher.parameters, (name, rank, record)
            else:
                assert record["teacher"] is None, (name, rank, record)
            assert record["layer_activation_bytes"] == per_layer, (name, rank, record)
    replicated = plan.estimate(load_config(base, LAYOUTS["tp2_replicated_teacher"]), 2).teacher
    assert replicated.tensor_parallel == 1 and "3 heads" in replicated.replicated_reason


@pytest.mark.parametrize("arch", sorted(plan.TEACHER_ARCHITECTURES))
def test_stage_parameters_sum_to_count_parameters(arch):
    model = ModelConfig(**plan.TEACHER_ARCHITECTURES[arch])
    assert plan.model_parameters(model, model.vocab_size) == count_parameters(model)["total"]
    # Padded: count_parameters at the padded vocabulary (its embedding and head grow together).
    padded = replace(model, vocab_size=model.vocab_size + 100)
    assert plan.model_parameters(model, padded.vocab_size) == count_parameters(padded)["total"]
    # PP 2 splits the layers; a tied head is copied onto the last stage.
    stages = plan.stage_parameters(model, 1, 2, padded_vocab=model.vocab_size)
    copy = 0 if model.untie_embeddings_and_output_weights else model.vocab_size * model.hidden_size
    assert sum(s["total"] for s in stages) == count_parameters(model)["total"] + copy


# ---------------------------------------------------------------------------------------------
# Formulas, written out by hand


def test_bytes_per_parameter_follow_megatron_lm():
    n = 1_000_000
    for dp in (1, 8, 32):
        bf16 = plan.state_bytes(n, dp, "bf16")
        assert bf16.weights + bf16.grads + bf16.optimizer_replicated == 18 * n
        assert bf16.weights + bf16.grads + bf16.optimizer_distributed == pytest.approx((6 + 12 / dp) * n)
        fp32 = plan.state_bytes(n, dp, "fp32")
        assert fp32.weights + fp32.grads + fp32.optimizer_replicated == 16 * n
        assert fp32.weights + fp32.grads + fp32.optimizer_distributed == pytest.approx((8 + 8 / dp) * n)


def megatron_lm_parameters(m: ModelConfig, padded_vocab: int) -> int:
    """Megatron-LM's compute_weight_and_optimizer_memory, most loaded shard at TP 1, PP 1."""
    h, a = m.hidden_size, m.num_attention_heads
    g = m.num_query_groups or a
    gated = 3 / 2 if m.activation == "swiglu" else 1
    norm = 1 if m.normalization == "RMSNorm" else 2
    layer = 2 * h * (m.ffn_hidden_size * gated + norm) + 2 * h * h * (1 + g / a)
    embedding = h * padded_vocab
    return round(layer * m.num_layers + norm * h + embedding * (2 if m.untie_embeddings_and_output_weights else 1))


@pytest.mark.parametrize("example", ["let_1.4b_smollm2.yaml", "baseline_7b.yaml"])
def test_weights_and_optimizer_match_megatron_lm_at_tp1(example):
    cfg = load_config(
        REPO / "examples" / example,
        ["teacher=null", "parallel.tensor_model_parallel_size=1", "parallel.sequence_parallel=false"],
    )
    estimate = plan.estimate(cfg, 32)
    n = megatron_lm_parameters(cfg.model, estimate.run.padded_vocab)
    stage = estimate.stages[0]
    assert stage.parameters["total"] == n
    state = stage.state
    assert state.weights + state.grads + state.optimizer_distributed == pytest.approx(n * (6 + 12 / 32))


GPT = ModelConfig(
    num_layers=24,
    hidden_size=1024,
    num_attention_heads=16,
    ffn_hidden_size=4096,
    vocab_size=51200,
    normalization="LayerNorm",
    activation="gelu",
    position_embedding_type="learned_absolute",
    hidden_dropout=0.1,
    attention_dropout=0.1,
)


@pytest.mark.parametrize("t", [1, 2, 4, 8])
def test_layer_activations_are_korthikanti_table_2(t):
    """Korthikanti et al. (2022), Table 2, bytes per layer for a GPT layer (16-bit, dropout)."""
    s, b, h, a = 2048, 4, GPT.hidden_size, GPT.num_attention_heads
    sbh = s * b * h

    def layer(sp, attention):
        return plan.layer_activation_bytes(GPT, s, b, t, sp, attention=attention, element_size=2)

    assert layer(False, plan.ATTENTION_STORED) == pytest.approx(sbh * (10 + 24 / t + 5 * a * s / (h * t)))
    assert layer(True, plan.ATTENTION_STORED) == pytest.approx(sbh / t * (34 + 5 * a * s / h))
    assert layer(False, plan.ATTENTION_RECOMPUTED) == pytest.approx(sbh * (10 + 24 / t))
    assert layer(True, plan.ATTENTION_RECOMPUTED) == pytest.approx(sbh * 34 / t)
    assert plan.layer_input_bytes(GPT, s, b, t, False) == 2 * sbh
    assert plan.layer_input_bytes(GPT, s, b, t, True) == pytest.approx(2 * sbh / t)
    if t == 1:
        assert layer(False, plan.ATTENTION_STORED) == sbh * (34 + 5 * a * s / h)


def test_layer_activations_of_a_llama_layer_tensor_by_tensor():
    """The generalisation (GQA, RoPE, SwiGLU, no dropout), as a list of the tensors kept, bf16."""
    m = ModelConfig(
        num_layers=32,
        hidden_size=4096,
        num_attention_heads=32,
        num_query_groups=8,
        ffn_hidden_size=11008,
        vocab_size=128256,
    )
    s, b, t = 1280, 4, 2
    h, kv, f = 4096, 128, 11008
    q, k = 32 * kv, 8 * kv
    sequence = {"input norm input": h, "QKV input": h, "pre-MLP norm input": h, "fc1 input": h}
    split = {
        "QKV output (Q, K, V)": q + 2 * k,
        "rotated Q": q,
        "rotated K": k,
        "context": q,
        "fc1 output (gate, up)": 2 * f,
        "fc2 input": f,
    }
    for sp in (False, True):
        expected = 2 * s * b * (sum(sequence.values()) / (t if sp else 1) + sum(split.values()) / t)
        stats = 4 * 32 * s * b / t  # fused attention's FP32 softmax statistics
        assert plan.layer_activation_bytes(m, s, b, t, sp, attention=plan.ATTENTION_FUSED) == pytest.approx(
            expected + stats
        )
        # Unfused SwiGLU keeps two FFN-wide tensors more (the linear half + offset, the SiLU output).
        unfused = plan.layer_activation_bytes(
            m, s, b, t, sp, attention=plan.ATTENTION_RECOMPUTED, fused_activation=False
        )
        assert unfused == pytest.approx(expected + 2 * 2 * s * b * f / t)


def test_pipeline_keeps_megatron_lms_microbatches_in_flight():
    assert [plan.in_flight(4, None, r, 16) for r in range(4)] == [4, 3, 2, 1]
    assert plan.in_flight(4, None, 0, 2) == 2  # fewer microbatches than stages
    for pp, vpp in ((2, 2), (4, 2), (4, 3), (8, 4)):
        penalty = 1 + (pp - 1) / (pp * vpp)  # Megatron-LM's interleaved-schedule memory penalty
        assert plan.in_flight(pp, vpp, 0, 64) * 1 == pytest.approx(penalty * pp)
    cfg = load_config(REPO / "examples" / "baseline_1.4b.yaml", ["parallel.pipeline_model_parallel_size=4"])
    run = plan.run_for(cfg, 32)
    per_layer = run.layer_bytes(plan.ATTENTION_FUSED)
    ids = 2 * 8 * run.seq * run.micro
    assert run.stage_activation_bytes(0, plan.RECOMPUTE_NONE_FUSED) == pytest.approx((per_layer * 6 + ids) * 4)
    assert run.stage_activation_bytes(1, plan.RECOMPUTE_NONE_FUSED) == pytest.approx(per_layer * 6 * 3)


def test_full_recompute_keeps_checkpoints_and_one_group():
    cfg = load_config(
        REPO / "examples" / "baseline_1.4b.yaml",
        ["parallel.recompute_granularity=full", "parallel.recompute_method=uniform", "parallel.recompute_num_layers=4"],
    )
    run = plan.run_for(cfg, 32)
    assert run.configured_mode.startswith("full (uniform: 4 layers")
    checkpoint = 2 * run.seq * run.micro * cfg.model.hidden_size
    expected = 24 // 4 * checkpoint + 4 * run.layer_bytes(plan.ATTENTION_FUSED) + 2 * 8 * run.seq * run.micro
    expected += 2 * checkpoint  # final norm and output layer inputs
    assert run.stage_activation_bytes(0, run.configured_mode) == pytest.approx(expected)


def test_logits_and_the_cross_entropy_copy():
    cfg = load_config(REPO / "examples" / "let_7b_llama3.2_1b.yaml", ["teacher=null"])
    run = plan.run_for(cfg, 32)
    elements = 4 * 1280 * 128256 / 2  # micro-batch × sequence × padded vocabulary / TP
    assert run.logits_bytes() == (2 * elements, 4 * elements)


# ---------------------------------------------------------------------------------------------
# The known teachers, as `convert` reads their published config.json

PUBLISHED = {  # the fields of each model's Hugging Face config.json that the conversion reads
    "smollm2-135m": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-05,
        "rope_theta": 100000,
        "rope_scaling": None,
        "tie_word_embeddings": True,
        "vocab_size": 49152,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.041666666666666664,
    },
    "smollm2-1.7b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 24,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "hidden_act": "silu",
        "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-05,
        "rope_theta": 130000,
        "rope_scaling": None,
        "tie_word_embeddings": True,
        "vocab_size": 49152,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
    },
    "pythia-160m": {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "hidden_act": "gelu",
        "max_position_embeddings": 2048,
        "layer_norm_eps": 1e-05,
        "rotary_emb_base": 10000,
        "rotary_pct": 0.25,
        "use_parallel_residual": True,
        "tie_word_embeddings": False,
        "vocab_size": 50304,
        "initializer_range": 0.02,
    },
    "opt-125m": {
        "architectures": ["OPTForCausalLM"],
        "model_type": "opt",
        "activation_function": "relu",
        "do_layer_norm_before": True,
        "ffn_dim": 3072,
        "hidden_size": 768,
        "init_std": 0.02,
        "max_position_embeddings": 2048,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "vocab_size": 50272,
        "word_embed_proj_dim": 768,
        "bos_token_id": 2,
        "eos_token_id": 2,
        "pad_token_id": 1,
    },
    "llama-3.2-1b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "hidden_act": "silu",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "tie_word_embeddings": True,
        "vocab_size": 128256,
        "attention_bias": False,
        "mlp_bias": False,
        "initializer_range": 0.02,
    },
}


@pytest.mark.parametrize("name", sorted(plan.TEACHER_ARCHITECTURES))
def test_known_teachers_are_what_convert_reads_from_their_config(name, tmp_path):
    pytest.importorskip("transformers")
    from megatron_let.convert import hf_model_config

    (tmp_path / "config.json").write_text(json.dumps(PUBLISHED[name]))
    converted = hf_model_config(tmp_path)
    preset = ModelConfig(**plan.TEACHER_ARCHITECTURES[name])
    assert replace(converted, init_method_std=preset.init_method_std) == preset


def test_a_teacher_from_a_hugging_face_directory_needs_no_arch(tmp_path):
    pytest.importorskip("transformers")
    model_dir = tmp_path / "pythia"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(PUBLISHED["pythia-160m"]))
    raw = yaml.safe_load((REPO / "examples" / "let_1.4b_pythia160m.yaml").read_text())
    raw["teacher"] = {"load": str(tmp_path / "not-converted-yet"), "hf_path": str(model_dir)}
    code, out, _ = run_plan("--config", str(write_config(tmp_path / "run.yaml", raw)), "--gpus", "32")
    assert code == 0 and f"from the Hugging Face model {model_dir}" in out
    assert "12 layers × 768, 12 heads, FFN 3072 (gelu), vocabulary 50304; 162.3 M parameters per GPU" in out


# ---------------------------------------------------------------------------------------------
# The command line


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_plan_runs_on_every_example(example):
    raw = yaml.safe_load(example.read_text())
    gpus = "32" if raw.get("device", "cuda") == "cuda" else "2"  # the CPU examples run on 2 processes
    code, out, err = run_plan("--config", str(example), "--gpus", gpus)
    assert code == 0, err
    assert "total (configured)" in out and "peak:" in out
    if raw.get("device", "cuda") == "cuda":
        assert ": fits (" in out, out  # every shipped GPU recipe fits 80 GiB


@pytest.mark.parametrize(
    "example", [p for p in EXAMPLES if "# $ megatron-let plan" in p.read_text()], ids=lambda p: p.stem
)
def test_the_memory_comment_of_each_example_is_the_commands_output(example):
    """Each GPU recipe carries `plan --brief`'s output under the command that printed it."""
    lines = example.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# $ megatron-let plan "))
    args = shlex.split(lines[start][len("# $ megatron-let plan ") :])
    assert args[args.index("--config") + 1] == f"examples/{example.name}"
    comment = []
    for line in lines[start + 1 :]:
        if not line.startswith("#   "):
            break
        comment.append(line[4:])
    code, out, err = run_plan(*[str(REPO / a) if a.startswith("examples/") else a for a in args])
    assert code == 0, err
    assert comment == out.splitlines(), "regenerate the comment:\n" + "\n".join(
        f"#   {line}" for line in out.splitlines()
    )


def test_gpu_recipes_carry_their_memory_comment():
    for example in EXAMPLES:
        if yaml.safe_load(example.read_text()).get("device", "cuda") == "cuda":
            assert "# $ megatron-let plan --config examples/" + example.name in example.read_text(), example.name


def test_an_unknown_teacher_is_left_out_and_said_so():
    example = str(REPO / "examples" / "let_1.4b_smollm2.yaml")
    code, out, _ = run_plan("--config", example, "--gpus", "32")
    assert code == 0
    assert "teacher unknown: teacher.load ckpt/smollm2-135m is not a checkpoint on this machine" in out
    assert "teacher weights" not in out
    code, out, _ = run_plan("--config", example, "--gpus", "32", "--teacher-arch", "smollm2-135m")
    assert code == 0 and "teacher: 30 layers × 576, 9 heads / 3 KV groups" in out
    assert "on pipeline stage 0 only (it owns target layer k=3)" in out and "teacher weights" in out
    # key=value overrides on a known teacher, and a teacher that TP 2 cannot shard
    code, out, _ = run_plan(
        "--config",
        str(REPO / "examples" / "let_7b_smollm2.yaml"),
        "--gpus",
        "32",
        "--teacher-arch",
        "smollm2-135m,num_layers=15",
    )
    assert code == 0 and "teacher: 15 layers × 576" in out
    assert "replicated on each TP rank (its 9 heads / 3 query groups do not divide TP=2)" in out


def test_a_teacher_of_another_vocabulary_is_refused():
    code, _, err = run_plan(
        "--config", str(REPO / "examples" / "let_1.4b_smollm2.yaml"), "--gpus", "32", "--teacher-arch", "pythia-160m"
    )
    assert code == 2 and "teacher.model.vocab_size: 50304 differs from model.vocab_size=49152" in err


def test_the_command_errors_clearly_when_the_gpus_do_not_divide():
    command = [sys.executable, "-m", "megatron_let.cli", "plan", "--config", "examples/let_7b_smollm2.yaml"]
    result = subprocess.run(command + ["--gpus", "31"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2
    assert (
        "megatron-let plan: --gpus 31 is not divisible by tensor_model_parallel_size × "
        "pipeline_model_parallel_size = 2 × 1 = 2"
    ) in result.stderr
    code, _, err = run_plan("--config", str(REPO / "examples" / "let_7b_smollm2.yaml"), "--gpus", "24")
    assert code == 2 and "global_batch_size=2048 is not divisible by micro_batch_size × data-parallel size" in err


def test_distillation_puts_the_teacher_and_its_kl_on_the_last_stage():
    """method rkd at PP 2: the teacher and the KL's tensors (teacher logits in BF16 + four FP32
    s·b·V/TP tensors, for each microbatch in flight on the last stage: one) count on stage 1."""
    smollm2 = json.dumps(plan.TEACHER_ARCHITECTURES["smollm2-135m"])
    cfg = load_config(
        REPO / "examples" / "rkd_1.4b_smollm2.yaml",
        ["parallel.pipeline_model_parallel_size=2", "teacher.load=null", f"teacher.model={smollm2}"],
    )
    estimate = plan.estimate(cfg, 32)
    run = estimate.run
    assert estimate.teacher.owner_rank == 1 and estimate.teacher.term == "KL"
    first, last = estimate.stages
    assert first.teacher_weights == first.alignment == 0 and last.teacher_weights > 0
    assert last.alignment == pytest.approx(run.seq * run.micro * run.padded_vocab * (2 + 16))
    assert "KL" in plan.render_brief(estimate) and "while the teacher runs" in plan.render_brief(estimate)
