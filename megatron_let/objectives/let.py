"""LET as an objective: the target's layer k is aligned with the frozen teacher's final hidden
state (Eq. 4–7), with weight λ(step) decaying linearly to 0 at S_stop (Eq. 5), after which the
teacher and the hook are released.

The teacher and the hook live only on the pipeline stage (and model chunk) that owns layer k; the
alignment loss joins the LM loss's backward there (see :mod:`.hook`). Every other rank holds
nothing but the schedule."""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state

from megatron_let.alignment import alignment_weight
from megatron_let.config import ConfigError, LETConfig, TeacherConfig, TokenizerConfig, resolve_layers
from megatron_let.data.preprocess import PreprocessError, build_tokenizer
from megatron_let.data.retokenize import Retokenizer
from megatron_let.flops import Convention, CostSchedule, TokenCost
from megatron_let.model.gpt import Kernels
from megatron_let.objectives.base import Objective, data_cost, until
from megatron_let.objectives.hook import AlignmentHook, find_layer, layer_owner, main_loss_scale
from megatron_let.objectives.teacher import Teacher, load_teacher_weights, teacher_cost, teacher_model


def _tokenizer(spec: TokenizerConfig, key: str):
    try:
        return build_tokenizer(spec.type, spec.model, spec.vocab_file, spec.merge_file, spec.gguf_file)
    except PreprocessError as err:
        raise ConfigError(f"{key}: {err}") from None


def build_retokenizer(cfg: LETConfig) -> Retokenizer:
    """LET†: the target's tokenizer (data.tokenizer) reads each sample back, the teacher's
    (teacher.tokenizer) tokenizes it again."""
    assert cfg.teacher is not None and cfg.teacher.tokenizer is not None and cfg.data.tokenizer is not None
    eod = cfg.data.eod_token_id if cfg.data.eod_token_id is not None else cfg.model.vocab_size - 1
    return Retokenizer(
        _tokenizer(cfg.data.tokenizer, "data.tokenizer"),
        _tokenizer(cfg.teacher.tokenizer, "teacher.tokenizer"),
        max_length=teacher_model(cfg.teacher).max_position_embeddings,
        target_eod=eod,
    )


class LETObjective(Objective):
    name = "let"

    def __init__(
        self,
        cfg: LETConfig,
        model: list,
        *,
        iteration: int,
        on_cpu: bool,
        use_te: bool,
        kernels: Kernels,
        device: torch.device,
        num_microbatches: int,
        log=print,
    ):
        self.cfg = cfg
        if cfg.teacher is None:
            raise ValueError("LET needs a teacher: give the config a teacher: section")
        self.teacher_cfg: TeacherConfig = cfg.teacher
        self.align = cfg.alignment
        self.device = device
        self.num_microbatches = num_microbatches
        self.log = log
        self.config = model[0].config
        self.target_layer, self.teacher_layer = resolve_layers(cfg)
        self.teacher: Optional[Teacher] = None
        self.hook: Optional[AlignmentHook] = None
        self.hook_chunk = None
        self.owner_stage: Optional[tuple[int, Optional[int]]] = None
        self.retokenizer: Optional[Retokenizer] = None  # LET†: the teacher reads its own tokenization
        # A run resumed past S_stop never builds the teacher.
        self.present = iteration < self.align.stop_step
        if self.present:
            self._build(model, on_cpu=on_cpu, use_te=use_te, kernels=kernels)

    # ----------------------------------------------------------------------------- building

    def _build(self, model: list, *, on_cpu: bool, use_te: bool, kernels: Kernels) -> None:
        """Teacher + hook on the stage owning layer k, then the teacher's weights."""
        owner_pp, owner_vp = layer_owner(self.config, self.target_layer)
        owns = parallel_state.get_pipeline_model_parallel_rank() == owner_pp
        if owns:
            self.teacher = Teacher(
                self.teacher_cfg,
                teacher_layer=self.teacher_layer,
                on_cpu=on_cpu,
                use_te=use_te,
                seed=self.cfg.training.seed + 1,
                kernels=kernels,
            )
            layer = find_layer(model, self.target_layer)
            assert layer is not None, f"layer {self.target_layer} should be on pipeline rank {owner_pp}"
            if self.teacher_cfg.tokenizer is not None:
                self.retokenizer = build_retokenizer(self.cfg)
            self.hook_chunk = model[owner_vp or 0]
            self.hook = AlignmentHook(
                layer,
                loss=self.align.loss,
                logsum_exponent=self.align.logsum_exponent,
                cca_ridge=self.align.cca_ridge,
                sequence_parallel=self.cfg.parallel.sequence_parallel,
            )
        self.owner_stage = (owner_pp, owner_vp)
        load_teacher_weights(self.teacher_cfg, self.teacher, self.log)

    # ----------------------------------------------------------------------------- a step

    def begin_step(self, iteration: int) -> float:
        weight = alignment_weight(iteration, self.align.lambda0, self.align.stop_step)
        if self.present and weight == 0.0:
            self.release(iteration)
        return weight

    def before_forward(self, model_chunk, batch: dict, weight: float, evaluating: bool = False) -> None:
        if evaluating or weight <= 0 or self.hook is None or self.teacher is None or model_chunk is not self.hook_chunk:
            return
        loss_mask = batch["loss_mask"]
        if self.retokenizer is None:
            teacher_hidden = self.teacher.hidden_states(
                batch["tokens"], batch["position_ids"], batch.get("attention_mask")
            )
        else:  # the same text in the teacher's tokens; its states at the target's positions
            view = self.retokenizer(batch["tokens"])
            teacher_hidden = view.gather(self.teacher.hidden_states(view.tokens, view.position_ids, None))
            loss_mask = loss_mask * view.valid.to(loss_mask.dtype)
        scale = main_loss_scale(self.config, self.num_microbatches, self.device)
        self.hook.prepare(teacher_hidden, loss_mask, weight, scale)

    def take_metric_sums(self) -> Optional[torch.Tensor]:
        """(Σ alignment loss, Σ cos, tokens) of this rank. TP ranks hold identical values unless
        the sequence is sharded across them: only TP rank 0 reports then."""
        if self.hook is None:
            return None
        sums = self.hook.take_metrics().sums
        if sums is None:
            return None
        if not self.cfg.parallel.sequence_parallel and parallel_state.get_tensor_model_parallel_rank() != 0:
            return None
        return sums

    def release(self, iteration: int) -> None:
        """λ reached 0: the teacher is never needed again."""
        self.present = False
        self.close()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()  # from here on the peak is the baseline's
        # Iteration i (1-based, as in the log) runs at step s = i - 1 of Eq. 5.
        self.log(f"iteration {iteration + 1}: λ = 0 from here on (S_stop={self.align.stop_step}); teacher released")

    def close(self) -> None:
        if self.hook is not None:
            self.hook.remove()
        if self.teacher is not None:
            self.teacher.release()
        self.hook = self.teacher = self.hook_chunk = None

    def describe(self) -> str:
        owner = self.owner_stage
        where = (
            f"pipeline stage {owner[0]}" + (f" chunk {owner[1]}" if owner[1] is not None else "")
            if owner
            else "released"
        )
        teacher = teacher_model(self.teacher_cfg)
        return (
            (
                "LET† (teacher tokenizer ≠ target's, states mapped by character offsets): "
                if self.teacher_cfg.tokenizer
                else ""
            )
            + f"LET: target layer {self.target_layer} ({where}) ← teacher "
            f"{'final hidden state' if self.teacher_layer is None else f'layer {self.teacher_layer}'} "
            f"({teacher.num_layers} layers × {teacher.hidden_size}), "
            f"{self.align.loss} loss, λ0 {self.align.lambda0} → 0 at step {self.align.stop_step}"
        )


def let_cost_schedule(cfg: LETConfig, convention: Convention) -> CostSchedule:
    """C_data + the teacher's forward up to the aligned layer (its final hidden state by default,
    no output layer) until S_stop, then C_data. The alignment term (interpolation, cosine) is
    O(d) per token: not counted."""
    _, teacher_layer = resolve_layers(cfg)
    teacher = teacher_cost(cfg, convention, layers=teacher_layer)
    data = data_cost(cfg, convention)
    return until(cfg.alignment.stop_step, TokenCost(data, teacher), TokenCost(data))
