"""GPTModel builders and layer specs: Transformer Engine on GPU, local modules otherwise."""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import (
    TransformerBlock,
    TransformerBlockSubmodules,
    get_num_layers_to_build,
)
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayerSubmodules

from megatron_let.config import ConfigError, ModelConfig, ParallelConfig, TrainingConfig
from megatron_let.model import initialization
from megatron_let.model.layers import ParallelResidualTransformerLayer, SeededTransformerLayer

logger = logging.getLogger(__name__)

_ACTIVATIONS = {
    "swiglu": (F.silu, True),
    "silu": (F.silu, False),
    "gelu": (F.gelu, False),
    "relu": (F.relu, False),
}


# Local layer specs name the norms on their own; Transformer Engine's fuse them into the next
# linear. Checkpoints use TE's names, so one saved with either spec loads into the other.
TE_NORM_NAMES = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(setting: str, on_cpu: bool) -> str:
    """``training.precision`` / ``teacher.precision``: "auto" is bf16 on a GPU, fp32 on the CPU."""
    if setting != "auto":
        return setting
    return "fp32" if on_cpu else "bf16"


def use_transformer_engine(transformer_impl: str, on_cpu: bool) -> bool:
    """Resolve ``training.transformer_impl``. On a GPU, "auto" means Transformer Engine and a
    missing TE is an error, not a silent fall-back to the (much slower) local layers."""
    if on_cpu:
        if transformer_impl == "transformer_engine":
            raise ConfigError("training.transformer_impl=transformer_engine needs device: cuda")
        return False
    if transformer_impl == "local":
        return False
    try:
        import transformer_engine  # noqa: F401
    except Exception as err:  # TE without its CUDA libraries fails with OSError, not ImportError
        raise ConfigError(
            f"training.transformer_impl={transformer_impl}: Transformer Engine does not import ({err}). "
            "Install transformer-engine[pytorch] matching your CUDA, or set training.transformer_impl: local "
            "to run megatron's local layers (slower, no fused kernels)"
        ) from err
    return True


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except Exception:  # CUDA extensions fail with OSError too
        return False
    return True


@dataclass(frozen=True)
class Kernels:
    """The fused kernels megatron uses (TransformerConfig's names)."""

    bias_activation_fusion: bool = False
    bias_dropout_fusion: bool = False
    apply_rope_fusion: bool = False
    gradient_accumulation_fusion: bool = False
    cross_entropy_loss_fusion: bool = False


def select_kernels(training: TrainingConfig, model: ModelConfig, use_te: bool) -> Kernels:
    """Each ``training.*_fusion`` flag: None = on with Transformer Engine where the model allows it;
    an explicit true that cannot work is an error naming the flag."""

    def pick(key: str, requested: Optional[bool], applicable: bool, reason: str) -> bool:
        if requested is None:
            return use_te and applicable
        if requested and not applicable:
            raise ConfigError(f"training.{key}=true: {reason}")
        return requested

    activation_fusable = model.activation == "swiglu" or (model.activation == "gelu" and model.add_bias_linear)
    return Kernels(
        bias_activation_fusion=pick(
            "bias_swiglu_fusion",
            training.bias_swiglu_fusion,
            activation_fusable,
            f"megatron fuses swiglu, or gelu with biases, not {model.activation}"
            + ("" if model.add_bias_linear else " without biases"),
        ),
        bias_dropout_fusion=pick("bias_dropout_fusion", training.bias_dropout_fusion, True, ""),
        apply_rope_fusion=pick(
            "apply_rope_fusion",
            training.apply_rope_fusion,
            use_te and model.position_embedding_type == "rope",
            "needs Transformer Engine and rotary position embeddings",
        ),
        # TE's GEMMs fuse it natively, but the output layer is megatron's own ColumnParallelLinear,
        # which needs apex's fused_weight_gradient_mlp_cuda (Megatron-LM turns it off without it).
        gradient_accumulation_fusion=pick(
            "gradient_accumulation_fusion",
            training.gradient_accumulation_fusion,
            use_te and _importable("fused_weight_gradient_mlp_cuda"),
            "needs Transformer Engine and apex's fused_weight_gradient_mlp_cuda "
            "extension (for megatron's output layer)",
        ),
        cross_entropy_loss_fusion=pick(
            "cross_entropy_loss_fusion",
            training.cross_entropy_loss_fusion,
            use_te,
            "needs device: cuda with Transformer Engine",
        ),
    )


def recompute_options(par: ParallelConfig) -> dict:
    """Activation recompute, as TransformerConfig takes it."""
    return {
        "recompute_granularity": par.recompute_granularity,
        "recompute_method": par.recompute_method,
        "recompute_num_layers": par.recompute_num_layers,
        "recompute_modules": list(par.recompute_modules) if par.recompute_modules is not None else None,
    }


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron-LM's padding: a multiple of ``make_vocab_size_divisible_by * TP``."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


def transformer_config(
    model: ModelConfig,
    *,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    virtual_pipeline_parallel: Optional[int] = None,
    sequence_parallel: bool = False,
    params_dtype: torch.dtype = torch.float32,
    on_cpu: bool = False,
    kernels: Kernels = Kernels(),
    recompute: Optional[dict] = None,
) -> TransformerConfig:
    activation, gated = _ACTIVATIONS[model.activation]
    bf16 = params_dtype == torch.bfloat16
    fp16 = params_dtype == torch.float16
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        ffn_hidden_size=model.ffn_hidden_size or 4 * model.hidden_size,
        kv_channels=model.kv_channels,
        normalization=model.normalization,
        layernorm_epsilon=model.layernorm_epsilon,
        activation_func=activation,
        gated_linear_unit=gated,
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias,
        init_method_std=model.init_method_std,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        tensor_model_parallel_size=tensor_parallel,
        pipeline_model_parallel_size=pipeline_parallel,
        virtual_pipeline_model_parallel_size=virtual_pipeline_parallel,
        sequence_parallel=sequence_parallel,
        params_dtype=params_dtype,
        bf16=bf16,
        fp16=fp16,
        pipeline_dtype=params_dtype,
        autocast_dtype=params_dtype,
        # Always: every weight is drawn on the CPU as the full tensor, then split across TP ranks
        # (megatron's _initialize_affine_weight_cpu; the TE wrappers do the same and hand TE a no-op
        # init), and the model is moved to the GPU afterwards. GPU initialisation draws each rank's
        # shard from the CUDA RNG tracker's model-parallel stream, seeded seed + 2718 + TP rank, so
        # it changes with TP. With the per-layer / per-name seeding of megatron_let.model.initialization
        # the initial model is then one function of the seed on every layout, CPU or GPU, TE or not.
        # Cost: one CPU draw of each stage's full weights per TP rank, at start-up only.
        use_cpu_initialization=True,
        # Our local attention is SDPA (no masked softmax) and our local norm is torch's (no apex):
        # these two only concern megatron's local modules; TE layers fuse attention and norms anyway.
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        **asdict(kernels),
        **(recompute or {}),
        # As on GPU (Megatron-LM's default): a stage's output is freed once sent, which requires
        # it not to be a view — the alignment hook's output at the end of a stage included.
        deallocate_pipeline_outputs=True,
        # gloo's batch_isend_irecv mismatches the interleaved schedule's paired sends/receives
        # (wrong activations from the third microbatch on); single isend/irecv are exact.
        batch_p2p_comm=not on_cpu,
    )


# ---------------------------------------------------------------------------------------------
# Local (non-TE) modules. They run anywhere, so they also serve the CPU mode.


class Norm(torch.nn.Module):
    """LayerNorm / RMSNorm over the last dimension, sequence-parallel aware.

    megatron's torch fallback refuses sequence parallelism; the only thing SP needs from a norm
    is that its weights are flagged so finalize_model_grads all-reduces their grads across TP.
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, **_unused):
        super().__init__()
        self.rms = config.normalization == "RMSNorm"
        self.eps = eps
        dtype = config.params_dtype
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=dtype))
        self.bias = None if self.rms else torch.nn.Parameter(torch.zeros(hidden_size, dtype=dtype))
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rms:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class SDPAttention(MegatronModule):
    """Core attention through ``torch.nn.functional.scaled_dot_product_attention``.

    Same interface as megatron's ``DotProductAttention`` (which allocates a CUDA buffer):
    query [sq, b, np, hn], key/value [sk, b, ng, hn] → context [sq, b, np·hn].
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str = "self",
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        **_unused,
    ):
        super().__init__(config=config)
        self.attn_mask_type = attn_mask_type
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.softmax_scale = softmax_scale

    def forward(
        self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None, packed_seq_params=None
    ):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPAttention supports neither packed sequences nor attention bias")
        groups = query.shape[2] // key.shape[2]
        if groups > 1:
            key = key.repeat_interleave(groups, dim=2)
            value = value.repeat_interleave(groups, dim=2)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, np, s, hn]
        mask_type = attn_mask_type or self.attn_mask_type
        causal = mask_type == AttnMaskType.causal
        mask = None
        if not causal and attention_mask is not None:
            mask = ~attention_mask  # megatron's masks are True where attention is *blocked*
        dropout = self.dropout if self.training else 0.0
        # As megatron's DotProductAttention: the attention dropout draws from the tracker's
        # model-parallel stream (different on each TP rank, whose heads differ); under sequence
        # parallelism the TransformerBlock has already forked it around the whole layer.
        rng = (
            tensor_parallel.get_cuda_rng_tracker().fork()
            if dropout > 0 and not self.config.sequence_parallel
            else contextlib.nullcontext()
        )
        with rng:
            context = F.scaled_dot_product_attention(
                q,
                k,
                v,
                attn_mask=mask,
                is_causal=causal,
                dropout_p=dropout,
                scale=self.softmax_scale,
            )
        sq, b = query.shape[0], query.shape[1]
        return context.permute(2, 0, 1, 3).reshape(sq, b, -1)


def local_layer_spec() -> ModuleSpec:
    """A Llama/GPT layer from megatron-core's own parallel linears + our Norm and SDPAttention
    (a :class:`SeededTransformerLayer`: layout-independent initial weights)."""
    return ModuleSpec(
        module=SeededTransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=Norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=ColumnParallelLinear,
                    core_attention=SDPAttention,
                    linear_proj=RowParallelLinear,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=Norm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
            ),
            mlp_bda=get_bias_dropout_add,
            # Checkpoint under Transformer Engine's names (TE fuses these norms into the next
            # linear), so a checkpoint saved on CPU loads into a TE model on GPU and back.
            sharded_state_dict_keys_map=TE_NORM_NAMES,
        ),
    )


def decoder_block_spec(
    config: TransformerConfig, use_te: bool, vp_stage: Optional[int], pp_rank: int, parallel_residual: bool = False
) -> ModuleSpec:
    """This stage's decoder: its layers and the final norm (TE's, or our SP-aware Norm; megatron's
    default torch norm refuses sequence parallelism). ``parallel_residual`` swaps in the GPT-NeoX
    layer, which keeps the same submodules (and so the same weights and checkpoint keys). Both layers
    are seeded per global layer index (megatron_let.model.initialization), with TE and local modules."""
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        layer, final_norm = get_gpt_layer_with_transformer_engine_spec(), TENorm
    else:
        layer, final_norm = local_layer_spec(), Norm
    layer_class = ParallelResidualTransformerLayer if parallel_residual else SeededTransformerLayer
    layer = ModuleSpec(module=layer_class, params=layer.params, submodules=layer.submodules)
    count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
    return ModuleSpec(
        module=TransformerBlock,
        submodules=TransformerBlockSubmodules(layer_specs=[layer] * count, layer_norm=final_norm),
    )


def build_gpt(
    model: ModelConfig,
    config: TransformerConfig,
    *,
    use_te: bool,
    tensor_parallel: int,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: Optional[int] = None,
    pg_collection=None,
    seed: Optional[int] = None,
) -> GPTModel:
    """One GPTModel (one pipeline stage / virtual chunk of it), on the CPU.

    Its initial weights are a function of ``seed`` and each parameter's global name only, the same
    for every TP / PP / VPP / DP layout (megatron_let.model.initialization). ``seed`` defaults to the one
    last given to ``torch.manual_seed`` (``parallel.seed_everything``; the teacher sets its own).
    Building leaves the process's RNG state as it found it."""
    if pg_collection is not None:
        pp_rank = torch.distributed.get_rank(pg_collection.pp)
    else:
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    with initialization.build_scope(torch.initial_seed() if seed is None else seed):
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=decoder_block_spec(
                config, use_te, vp_stage, pp_rank, parallel_residual=model.parallel_residual
            ),
            vocab_size=padded_vocab_size(model.vocab_size, model.make_vocab_size_divisible_by, tensor_parallel),
            max_sequence_length=model.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=not model.untie_embeddings_and_output_weights,
            position_embedding_type=model.position_embedding_type,
            rotary_percent=model.rotary_percent,
            rotary_base=model.rotary_base,
            rope_scaling=model.rope_scaling,
            rope_scaling_factor=model.rope_scaling_factor,
            vp_stage=vp_stage,
            pg_collection=pg_collection,
        )
        initialization.init_embedding_and_output(gpt, model.vocab_size)
    return gpt


def unwrap(module: torch.nn.Module) -> GPTModel:
    """The GPTModel inside megatron's DDP / Float16Module wrappers."""
    while not isinstance(module, GPTModel) and isinstance(getattr(module, "module", None), torch.nn.Module):
        module = module.module  # type: ignore[assignment]
    assert isinstance(module, GPTModel), f"no GPTModel inside {type(module).__name__}"
    return module


def count_parameters(model: ModelConfig) -> dict:
    """Parameter counts of the full (unsharded) model, from its config alone."""
    h, L = model.hidden_size, model.num_layers
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    kv = model.kv_channels or h // heads
    ffn = model.ffn_hidden_size or 4 * h
    gated = model.activation == "swiglu"
    bias = model.add_bias_linear
    norm = h if model.normalization == "RMSNorm" else 2 * h
    qkv = h * (heads + 2 * groups) * kv + ((heads + 2 * groups) * kv if (bias or model.add_qkv_bias) else 0)
    proj = heads * kv * h + (h if bias else 0)
    fc1 = h * ffn * (2 if gated else 1) + (ffn * (2 if gated else 1) if bias else 0)
    fc2 = ffn * h + (h if bias else 0)
    per_layer = qkv + proj + fc1 + fc2 + 2 * norm
    vocab = model.vocab_size
    embedding = vocab * h + (
        model.max_position_embeddings * h if model.position_embedding_type == "learned_absolute" else 0
    )
    output = vocab * h if model.untie_embeddings_and_output_weights else 0
    non_embedding = L * per_layer + norm
    return {
        "non_embedding": non_embedding,
        "embedding": embedding + output,
        "total": non_embedding + embedding + output,
    }
