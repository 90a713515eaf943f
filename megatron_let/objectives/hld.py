"""Hidden-layer distillation with a composite loss (``hldc``, the compute-matched paper's HLDC).

Per token, Eq. 3 with β = 1 − α: ``(1 − α)·NLL + α·τ²·KL + γ·L_hint``, where L_hint is the
normalised MSE between the teacher's layer D_T/2 and a learned linear map W_R of the student's
layer D_S/2 (:func:`megatron_let.distillation.hint_distance`). The logit terms are
:class:`~.kd.KDObjective`'s; the hint term is attached to the student's layer by the same
pipeline-stage-aware hook LET uses (:mod:`.hook`), so it joins the one backward pass on whichever
stage owns that layer.

W_R is trained with the student: :func:`add_regressor` makes it a submodule of the model chunk
that owns the student's layer before megatron wraps the chunk, so megatron's DDP (gradient
reduction), optimizer and distributed checkpoint carry it like any of the chunk's own replicated
parameters (key ``hint_regressor.weight``, resharded to whichever stage owns the layer). Under
sequence parallelism each TP rank sees part of the tokens: its gradient is summed over TP, as for
the norms (``sequence_parallel`` attribute, read by megatron's ``finalize_model_grads``).

The teacher runs on the stage owning the student's layer (as far as layer D_T/2) and on the last
stage (all of it, for the logits); once on a stage that is both.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.utils import get_attr_wrapped_model

from megatron_let.config import LETConfig, resolve_hint_layers
from megatron_let.flops import teacher_flops_per_token
from megatron_let.model import initialization
from megatron_let.model.gpt import unwrap
from megatron_let.objectives.hook import AlignmentHook, find_layer, layer_owner, main_loss_scale
from megatron_let.objectives.kd import KDObjective
from megatron_let.objectives.teacher import teacher_model

REGRESSOR = "hint_regressor"  # the attribute (and checkpoint key prefix) on the owning chunk


def add_regressor(cfg: LETConfig, chunk: torch.nn.Module) -> None:
    """Give ``chunk`` (a GPTModel, not yet wrapped) the regressor W_R if it owns the student's
    hint layer. Its initial weights depend on the seed only (not on the layout)."""
    student_layer, _ = resolve_hint_layers(cfg)
    if find_layer([chunk], student_layer) is None:
        return
    d_student, d_teacher = cfg.model.hidden_size, teacher_model(cfg.teacher).hidden_size  # type: ignore[arg-type]
    with initialization.build_scope(cfg.training.seed), initialization.seeded(REGRESSOR):
        regressor = torch.nn.Linear(d_student, d_teacher, bias=False)
    for param in regressor.parameters():
        param.sequence_parallel = cfg.parallel.sequence_parallel  # type: ignore[attr-defined]
    setattr(chunk, REGRESSOR, regressor)


class HLDCObjective(KDObjective):
    name = "hldc"
    metric_keys = ("kd_loss", "hint_loss")
    metric_labels = {"kd_loss": "kd loss", "hint_loss": "hint loss"}

    def __init__(self, cfg: LETConfig, model: list, *, num_microbatches: int, **build):
        self.student_layer, self.teacher_layer = resolve_hint_layers(cfg)
        self.config = model[0].config
        owner_pp, owner_vp = layer_owner(self.config, self.student_layer)
        self.owns_hint = parallel_state.get_pipeline_model_parallel_rank() == owner_pp
        self.num_microbatches = num_microbatches
        self._logits_ahead: Optional[torch.Tensor] = None  # the teacher's logits, run with the hint state
        super().__init__(cfg, model, num_microbatches=num_microbatches, **build)
        self.gamma = cfg.hld.gamma
        self.hook: Optional[AlignmentHook] = None
        self.hook_chunk = None
        if self.owns_hint:
            # The hook stays after the teacher is released: it keeps W_R in the graph (zero term).
            self.hook_chunk = model[owner_vp or 0]
            layer = find_layer(model, self.student_layer)
            assert layer is not None, f"layer {self.student_layer} should be on pipeline rank {owner_pp}"
            self.hook = AlignmentHook(
                layer,
                loss="hint",
                sequence_parallel=cfg.parallel.sequence_parallel,
                regressor=getattr(unwrap(self.hook_chunk), REGRESSOR),
            )

    def _runs_a_teacher(self) -> bool:
        return True  # the hint term's teacher state is never cached

    def _holds_teacher(self) -> bool:
        return self.owns_hint or super()._holds_teacher()

    def before_forward(self, model_chunk, batch: dict, weight: float, evaluating: bool = False) -> None:
        self._logits_ahead = None
        if evaluating or self.teacher is None or self.hook is None or model_chunk is not self.hook_chunk:
            return
        # The stage that also computes the logits runs the teacher once for both terms.
        with_logits = bool(get_attr_wrapped_model(model_chunk, "post_process")) and self.cache is None
        state, logits = self.teacher.run(
            batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
            layer=self.teacher_layer, logits=with_logits,
        )  # fmt: skip
        self._logits_ahead = logits
        scale = main_loss_scale(self.config, self.num_microbatches, self.device)
        self.hook.prepare(state, batch["loss_mask"], self.gamma, scale)

    def _teacher_logits(self, batch: dict) -> torch.Tensor:
        logits, self._logits_ahead = self._logits_ahead, None
        return logits if logits is not None else super()._teacher_logits(batch)

    def take_metric_sums(self) -> Optional[torch.Tensor]:
        """(Σ KL, Σ hint loss, tokens): the KL and the token count from the last stage's TP rank 0,
        the hint sums from the hint layer's stage (every TP rank's own tokens under sequence
        parallelism, else TP rank 0's) — the same tokens, so the means are over one count."""
        kd = super().take_metric_sums()
        hint = self.hook.take_metrics().sums if self.hook is not None else None
        if hint is not None and not self.cfg.parallel.sequence_parallel:
            hint = hint if parallel_state.get_tensor_model_parallel_rank() == 0 else None
        if kd is None and hint is None:
            return None
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        if kd is not None:
            sums[0], sums[2] = kd[0], kd[1]
        if hint is not None:
            sums[1] = hint[0]
        return sums

    def close(self) -> None:
        if self.hook is not None:
            self.hook.remove()
        self.hook = self.hook_chunk = None
        super().close()

    def _teacher_flops_per_token(self, seq_length: int) -> float:
        """KD's (the teacher's whole forward) plus training W_R, 6·d_S·d_T per token (the paper's
        6·N_reg), while the teacher runs. The teacher's partial second forward on the hint stage
        under pipeline parallelism is an implementation cost, not counted."""
        teacher = teacher_model(self.teacher_cfg)
        logits = super()._teacher_flops_per_token(seq_length)
        if self.distill.teacher_cache:  # the logits are cached: the teacher runs to its hint layer only
            logits = teacher_flops_per_token(teacher, seq_length, self.teacher_layer)
        return logits + 6 * self.cfg.model.hidden_size * teacher.hidden_size

    def describe(self) -> str:
        teacher = teacher_model(self.teacher_cfg)
        return (
            super().describe() + f"; + {self.gamma}·hint: student layer {self.student_layer} → W_R "
            f"({self.cfg.model.hidden_size}→{teacher.hidden_size}) ← teacher layer {self.teacher_layer}, "
            "normalised MSE"
        )
