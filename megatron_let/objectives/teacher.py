"""The colocated small teacher: build, load, run, release.

A frozen megatron-core ``GPTModel`` with its own architecture. It lives only on the pipeline stage
that needs it (LET: the one owning the target's layer k; logit distillation: the last), is never pipelined, and is tensor-parallel over that stage's TP
group when its heads divide TP (otherwise every TP rank holds a full replica). It runs under
``no_grad`` in eval mode, has no optimizer state and is never part of the target's checkpoint.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.process_groups_config import ProcessGroupCollection

from megatron_let import checkpoint
from megatron_let.config import LETConfig, ModelConfig, TeacherConfig
from megatron_let.flops import Convention, teacher_flops_per_token
from megatron_let.model.gpt import DTYPES, TE_NORM_NAMES, Kernels, build_gpt, resolve_precision, transformer_config
from megatron_let.platform import distributed as parallel

logger = logging.getLogger(__name__)


def teacher_model(cfg: TeacherConfig) -> ModelConfig:
    """The teacher's architecture (run_config resolves it from teacher.load / hf_path first)."""
    if cfg.model is None:
        raise ValueError("teacher.model is not resolved: load the config with megatron_let.run_config.load_run_config")
    return cfg.model


def teacher_cost(cfg: LETConfig, convention: Convention, *, layers: Optional[int] = None, head: bool = False) -> float:
    """FLOPs per token of the configured teacher's forward up to layer ``layers`` (all by default),
    with its output layer when ``head`` (megatron_let.flops, in ``convention``)."""
    assert cfg.teacher is not None
    return teacher_flops_per_token(
        teacher_model(cfg.teacher),
        cfg.training.seq_length,
        convention,
        layers=layers,
        head=head,
        tensor_parallel=cfg.parallel.tensor_model_parallel_size,
    )


def load_teacher_weights(cfg: TeacherConfig, teacher: Optional["Teacher"], log=print) -> None:
    """The teacher's weights: from ``teacher.load`` (a megatron-let checkpoint; collective, every
    rank calls it, ``teacher`` None where this rank holds none) or else read from
    ``teacher.hf_path`` by each rank that holds the teacher, in this process."""
    if cfg.load and (cfg.hf_path is None or checkpoint.has_checkpoint(cfg.load)):
        checkpoint.load_model_weights(cfg.load, teacher.model if teacher else None)
    elif cfg.hf_path is not None and teacher is not None:
        teacher.load_hugging_face(cfg.hf_path, cfg.gguf_file)
        if torch.distributed.get_rank() == 0:
            log(f"teacher weights read from {cfg.hf_path}")


@dataclass
class TeacherLayout:
    tensor_parallel: int  # 1 = replicated on each TP rank
    replicated_reason: Optional[str] = None


def teacher_layout(cfg: TeacherConfig, tp: int) -> TeacherLayout:
    model = teacher_model(cfg)
    heads = model.num_attention_heads
    groups = model.num_query_groups or heads
    ffn = model.ffn_hidden_size or 4 * model.hidden_size
    if tp > 1 and (heads % tp or groups % tp):
        return TeacherLayout(1, f"its {heads} heads / {groups} query groups do not divide TP={tp}")
    if tp > 1 and ffn % tp:
        return TeacherLayout(1, f"its FFN width {ffn} does not divide TP={tp}")
    return TeacherLayout(tp)


class Teacher:
    """Runs the frozen teacher and returns the hidden states LET aligns to."""

    def __init__(
        self,
        cfg: TeacherConfig,
        *,
        teacher_layer: Optional[int],
        on_cpu: bool,
        use_te: bool,
        seed: int = 0,
        kernels: Optional[Kernels] = None,
    ):
        self.cfg = cfg
        self.model_config = model = teacher_model(cfg)
        self.teacher_layer = teacher_layer  # None: final hidden state, after the final norm
        tp = parallel_state.get_tensor_model_parallel_world_size()
        self.layout = teacher_layout(cfg, tp)
        if self.layout.replicated_reason:
            logger.warning("teacher replicated on each of the %d TP ranks: %s", tp, self.layout.replicated_reason)
        kernels = kernels or Kernels()
        self.dtype = DTYPES[resolve_precision(cfg.precision, on_cpu)]

        pgs = ProcessGroupCollection.use_mpu_process_groups(["tp", "pp", "cp", "embd", "pos_embd", "tp_cp", "mp"])
        own = parallel.singleton_group()
        pgs.pp = own  # never pipelined: the owning stage runs all of it
        pgs.embd = own
        pgs.pos_embd = own
        if self.layout.tensor_parallel == 1:
            pgs.tp = own
            pgs.tp_cp = own
            pgs.mp = own
        config = transformer_config(
            model,
            tensor_parallel=self.layout.tensor_parallel,
            params_dtype=self.dtype,
            on_cpu=on_cpu,
            # Forward only: the activation / RoPE fusions apply, the gradient ones do not.
            kernels=Kernels(
                bias_activation_fusion=kernels.bias_activation_fusion and model.activation == "swiglu",
                bias_dropout_fusion=kernels.bias_dropout_fusion,
                apply_rope_fusion=kernels.apply_rope_fusion and model.position_embedding_type == "rope",
            ),
        )
        if cfg.load is None:
            logger.warning("teacher.load is not set: the teacher has random weights (useful for tests only)")
        # Its own seed, so a (random) teacher is the same whenever it is built, e.g. after a resume.
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if not on_cpu else []):
            torch.manual_seed(seed)
            self.model = build_gpt(
                model,
                config,
                use_te=use_te,
                tensor_parallel=self.layout.tensor_parallel,
                pg_collection=pgs,
            )
        if not on_cpu:
            self.model.cuda(torch.cuda.current_device())
        self.model.eval()
        self.model.requires_grad_(False)

    def load_hugging_face(self, path: str, gguf_file: Optional[str] = None) -> None:
        """Weights straight from a Hugging Face model (as ``teacher.hf_path`` gives it), through the
        converter's tables: the full state dict, then this rank's tensor-parallel part of it."""
        from megatron_let.convert import ConversionError, load_into, read_hf, shard_state_dict

        hf = read_hf(path, gguf_file)
        tp = self.layout.tensor_parallel
        rank = parallel_state.get_tensor_model_parallel_rank() if tp > 1 else 0
        shard = shard_state_dict(hf.state, self.model_config, rank, tp)
        names = self.model.state_dict().keys()
        for local, fused in TE_NORM_NAMES.items():  # Transformer Engine fuses the norms into the next linear
            shard = {k.replace(local, fused) if k not in names else k: v for k, v in shard.items()}
        try:
            load_into(self.model, shard)
        except ConversionError as err:
            raise ConversionError(f"teacher.hf_path: {path}: {err}") from None

    @torch.no_grad()
    def hidden_states(
        self, tokens: torch.Tensor, position_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """[s, b, d_T] hidden states for tokens [b, s]: the final one (after the final norm, where
        Hugging Face's ``hidden_states[-1]`` is) or that of ``teacher_layer``. The output head is
        never run: LET needs no teacher logits."""
        return self.run(tokens, position_ids, attention_mask, layer=self.teacher_layer)[0]

    @torch.no_grad()
    def logits(
        self, tokens: torch.Tensor, position_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]
    ) -> torch.Tensor:
        """[s, b, V_T / TP_T] logits (this rank's vocabulary columns when the teacher is
        tensor-parallel, all of them when it is replicated): the final hidden state through the
        output layer (tied to the embedding when the teacher ties them)."""
        logits = self.run(tokens, position_ids, attention_mask, layer=None, logits=True)[1]
        assert logits is not None
        return logits

    @torch.no_grad()
    def run(
        self,
        tokens: torch.Tensor,
        position_ids: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        *,
        layer: Optional[int],
        logits: bool = False,
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """One forward, as far as needed: (the output of 1-based ``layer``, or the final hidden
        state after the final norm when None; the logits when asked, else None). The layers past
        ``layer`` run only for the logits."""
        gpt = self.model
        hidden = gpt.embedding(input_ids=tokens, position_ids=position_ids)
        rotary = None
        if gpt.position_embedding_type == "rope":
            rotary = gpt.rotary_pos_emb(tokens.shape[1])
        layers = gpt.decoder.layers
        stop = len(layers) if logits or layer is None else layer
        state = None
        for number, block in enumerate(layers[:stop], start=1):
            hidden, _ = block(hidden, attention_mask=attention_mask, rotary_pos_emb=rotary)
            if number == layer:
                state = hidden
        if stop == len(layers) and gpt.decoder.final_layernorm is not None:
            hidden = gpt.decoder.final_layernorm(hidden)
        if state is None:
            state = hidden
        if not logits:
            return state, None
        weight = gpt.shared_embedding_or_output_weight() if gpt.share_embeddings_and_output_weights else None
        out, _ = gpt.output_layer(hidden, weight=weight)
        return state, out

    def release(self) -> None:
        """Free the teacher's memory: after S_stop it is never needed again."""
        del self.model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
