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
from megatron_let.flops import (
    Convention,
    CostSchedule,
    TokenCost,
    regressor_flops_per_token,
    student_flops_per_token,
)
from megatron_let.model import initialization
from megatron_let.model.gpt import unwrap
from megatron_let.objectives.base import NOT_COMPUTED, PhasedSchedule, data_cost, until
from megatron_let.objectives.hook import AlignmentHook, find_layer, layer_owner, main_loss_scale
from megatron_let.objectives.kd import KDObjective, logit_teacher_cost
from megatron_let.objectives.teacher import teacher_cost, teacher_model

REGRESSOR = "hint_regressor"  # the attribute (and checkpoint key prefix) on the owning chunk
FROZEN_IN_PHASE1 = "hldf_frozen_in_phase1"  # parameter attribute: the layers after the hint layer


def add_regressor(cfg: LETConfig, chunk: torch.nn.Module) -> None:
    """Give ``chunk`` (a GPTModel, not yet wrapped) the regressor if it owns the student's hint
    layer: W_R (linear, hldc) or FitNets' MLP (hldf). Its initial weights depend on the seed only
    (not on the layout). For hldf, mark what phase 1 freezes: the layers after the hint layer, the
    final norm, and an untied output layer (a tied one is the embedding, trained in phase 1)."""
    student_layer, _ = resolve_hint_layers(cfg)
    if cfg.objective == "hldf":
        gpt = unwrap(chunk)
        frozen = [layer for layer in gpt.decoder.layers if layer.layer_number > student_layer]
        if getattr(gpt.decoder, "final_layernorm", None) is not None:
            frozen.append(gpt.decoder.final_layernorm)
        if gpt.post_process and not gpt.share_embeddings_and_output_weights:
            frozen.append(gpt.output_layer)
        for module in frozen:
            for param in module.parameters():
                setattr(param, FROZEN_IN_PHASE1, True)
    if find_layer([chunk], student_layer) is None:
        return
    d_student, width, d_teacher = regressor_widths(cfg)
    with initialization.build_scope(cfg.training.seed), initialization.seeded(REGRESSOR):
        if width is None:
            regressor: torch.nn.Module = torch.nn.Linear(d_student, d_teacher, bias=False)
        else:
            regressor = torch.nn.Sequential(
                torch.nn.Linear(d_student, width), torch.nn.GELU(), torch.nn.Linear(width, d_teacher)
            )
    for param in regressor.parameters():
        param.sequence_parallel = cfg.parallel.sequence_parallel  # type: ignore[attr-defined]
    setattr(chunk, REGRESSOR, regressor)


def regressor_widths(cfg: LETConfig) -> tuple[int, Optional[int], int]:
    """(d_S, the MLP's hidden width or None for the linear W_R, d_T): hld.regressor, else linear
    for hldc and FitNets' MLP for hldf."""
    d_student, d_teacher = cfg.model.hidden_size, teacher_model(cfg.teacher).hidden_size  # type: ignore[arg-type]
    kind = cfg.hld.regressor or ("mlp" if cfg.objective == "hldf" else "linear")
    return d_student, (cfg.hld.mlp_expansion * d_student if kind == "mlp" else None), d_teacher


def regressor_parameters(cfg: LETConfig) -> int:
    """N_reg: the regressor's parameter count."""
    d_student, width, d_teacher = regressor_widths(cfg)
    if width is None:
        return d_student * d_teacher
    return d_student * width + width + width * d_teacher + d_teacher


def hldf_schedule(cfg: LETConfig) -> PhasedSchedule:
    assert cfg.hld.phase1_iters is not None
    return PhasedSchedule(cfg.hld.phase1_iters, cfg.hld.phase1_warmup_iters, FROZEN_IN_PHASE1)


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
        with_logits = (
            self._logit_term() and bool(get_attr_wrapped_model(model_chunk, "post_process")) and self.cache is None
        )
        state, logits = self.teacher.run(
            batch["tokens"], batch["position_ids"], batch.get("attention_mask"),
            layer=self.teacher_layer, logits=with_logits,
        )  # fmt: skip
        self._logits_ahead = logits
        scale = main_loss_scale(self.config, self.num_microbatches, self.device)
        self.hook.prepare(state, batch["loss_mask"], self.gamma, scale)

    def _logit_term(self) -> bool:
        """Whether this step distils logits too (HLDF's phase 1 does not)."""
        return True

    def _no_hint_term(self) -> bool:
        """Whether this step has no hint term anywhere (HLDF's phase 2)."""
        return False

    def _teacher_logits(self, batch: dict) -> torch.Tensor:
        logits, self._logits_ahead = self._logits_ahead, None
        return logits if logits is not None else super()._teacher_logits(batch)

    def take_metric_sums(self) -> Optional[torch.Tensor]:
        """(Σ KL, Σ hint loss, tokens): the KL and the token count from the last stage's TP rank 0,
        the hint sums from the hint layer's stage (every TP rank's own tokens under sequence
        parallelism, else TP rank 0's) — the same tokens, so the means are over one count (the
        hint stage's, when there is no KL term)."""
        kd = super().take_metric_sums()
        hint = self.hook.take_metrics().sums if self.hook is not None else None
        if hint is not None and not self.cfg.parallel.sequence_parallel:
            hint = hint if parallel_state.get_tensor_model_parallel_rank() == 0 else None
        if kd is None and hint is None:
            return None
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)
        if not self._logit_term():
            sums[0] = float("nan")  # no KL term this step, anywhere: not measured
        if kd is not None:
            sums[0], sums[2] = kd[0], kd[1]
        if self._no_hint_term():
            sums[1] = float("nan")
        if hint is not None:
            sums[1] = hint[0]
            if not self._logit_term():  # no KL counts the tokens: the hint stage does
                sums[2] = hint[2]
        return sums

    def close(self) -> None:
        if self.hook is not None:
            self.hook.remove()
        self.hook = self.hook_chunk = None
        super().close()

    def describe(self) -> str:
        teacher = teacher_model(self.teacher_cfg)
        return (
            super().describe() + f"; + {self.gamma}·hint: student layer {self.student_layer} → W_R "
            f"({self.cfg.model.hidden_size}→{teacher.hidden_size}) ← teacher layer {self.teacher_layer}, "
            "normalised MSE"
        )


def first_layers_forward(model_chunk, batch: dict, last_layer: int) -> torch.Tensor:
    """This chunk's part of a forward that stops after global layer ``last_layer``: the embedding
    (first stage) or the received activation, then the chunk's layers up to ``last_layer``; the
    later ones are not run. Returns what the chunk hands on: the hidden state ``[s, b, h]`` (for
    the next stage), unchanged past ``last_layer``."""
    gpt = unwrap(model_chunk)
    tokens, position_ids, mask = batch["tokens"], batch["position_ids"], batch.get("attention_mask")
    if gpt.pre_process:
        hidden = gpt.embedding(input_ids=tokens, position_ids=position_ids)
    else:
        hidden = gpt.decoder.input_tensor
    rotary = gpt.rotary_pos_emb(tokens.shape[1]) if gpt.position_embedding_type == "rope" else None
    for layer in gpt.decoder.layers:
        if layer.layer_number <= last_layer:
            hidden, _ = layer(hidden, attention_mask=mask, rotary_pos_emb=rotary)
    return hidden


class HLDFObjective(HLDCObjective):
    """FitNets' two phases (the compute-matched paper's HLDF). Phase 1, iterations ≤
    ``hld.phase1_iters``: the student's layers up to the hint layer and the MLP regressor train on
    the normalised hint loss alone (weight 1); the layers after it are not run, their parameters
    frozen at lr 0 (:class:`~megatron_let.training.optimizer.PhasedScheduler`). Phase 2: KD
    (``(1 − α)·NLL + α·τ²·KL``) over the whole student, the lr warmed up again. The phase follows
    from the iteration, so a run resumes in either."""

    name = "hldf"

    def __init__(self, cfg: LETConfig, model: list, *, iteration: int, **build):
        assert cfg.hld.phase1_iters is not None
        self.boundary = cfg.hld.phase1_iters
        self.phase = 1 if iteration < self.boundary else 2
        super().__init__(cfg, model, iteration=iteration, **build)
        self.gamma = 1.0  # phase 1 minimises the hint loss alone
        # Every parameter in each step's graph (megatron's overlapped reduction waits for all).
        self._frozen = {
            id(chunk): [p for p in chunk.parameters() if getattr(p, FROZEN_IN_PHASE1, False)] for chunk in model
        }

    def begin_step(self, iteration: int) -> float:
        phase = 1 if iteration < self.boundary else 2
        if phase != self.phase:
            self.log(f"iteration {iteration + 1}: HLDF phase 2: KD over the whole student, lr warmed up again")
        self.phase = phase
        return 1.0 if phase == 1 else self.distill.alpha

    def before_forward(self, model_chunk, batch: dict, weight: float, evaluating: bool = False) -> None:
        if self.phase == 1:
            super().before_forward(model_chunk, batch, weight, evaluating)
        else:
            self._logits_ahead = None

    def forward(self, model_chunk, batch: dict, weight: float, evaluating: bool = False):
        if evaluating or self.phase == 2:
            return super().forward(model_chunk, batch, weight, evaluating)
        self.before_forward(model_chunk, batch, weight, evaluating)  # arms the hint hook
        hidden = first_layers_forward(model_chunk, batch, self.student_layer)
        last_stage = get_attr_wrapped_model(model_chunk, "post_process")
        frozen = self._frozen.get(id(model_chunk))
        if frozen:  # a zero that reaches them: their gradient is 0, and present
            hidden = hidden + 0.0 * torch.stack([p.sum() for p in frozen]).sum().to(hidden.dtype)
        elif not last_stage:
            hidden = hidden.clone()  # a stage output of its own (megatron frees it after sending)
        if not last_stage:
            return hidden, None
        # The last stage's "loss": zero, tied to the graph so the backward reaches the hint layer.
        zero = torch.zeros(batch["tokens"].shape, device=hidden.device) + 0.0 * hidden.float().sum()
        return zero, NOT_COMPUTED

    def _logit_term(self) -> bool:
        return self.phase == 2

    def _no_hint_term(self) -> bool:
        return self.phase == 2

    def describe(self) -> str:
        d = self.distill
        return (
            f"hldf: phase 1 (iterations 1–{self.boundary}): student layers 1–{self.student_layer} + MLP regressor "
            f"({'→'.join(str(w) for w in regressor_widths(self.cfg) if w is not None)}) ← teacher layer {self.teacher_layer}, normalised MSE alone, later layers frozen "
            f"and not run; phase 2: (1 − {d.alpha})·NLL + {d.alpha}·τ²·KL, τ {d.temperature}, "
            f"{'whole vocabulary' if d.top_k is None else f'teacher top-{d.top_k} renormalised'}, lr warmed up again"
        )


# ------------------------------------------------------------------------------------ FLOPs


def hldc_cost_schedule(cfg: LETConfig, convention: Convention) -> CostSchedule:
    """C_HLDC = C_KD + 6·N_reg (the paper's A.9) while the teacher runs. With the logits cached
    the teacher still runs to its hint layer (C_Teacher·D/2 of its layers). Under pipeline
    parallelism the hint stage runs the teacher's first layers a second time when the hint and
    the last stage differ: an implementation cost of the layout, not counted (as activation
    recompute is not)."""
    _, teacher_layer = resolve_hint_layers(cfg)
    teacher = logit_teacher_cost(cfg, convention)
    if cfg.distillation.teacher_cache:
        teacher = teacher_cost(cfg, convention, layers=teacher_layer)
    regressor = regressor_flops_per_token(regressor_parameters(cfg))
    data = data_cost(cfg, convention)
    return until(cfg.distillation.stop_step, TokenCost(data, teacher, regressor), TokenCost(data))


def hldf_phase_costs(cfg: LETConfig, convention: Convention) -> tuple[TokenCost, TokenCost]:
    """(phase 1, phase 2) per token. Phase 1 is the paper's C_HT = 3N + 6·N_reg + C_Teacher/2:
    training the student's layers up to the hint layer (no output layer: 6N·m/L), the MLP
    regressor, the teacher's forward to its hint layer. Phase 2 is C_KD."""
    student_layer, teacher_layer = resolve_hint_layers(cfg)
    hint = TokenCost(
        student_flops_per_token(
            cfg.model,
            cfg.training.seq_length,
            convention,
            layers=student_layer,
            logits=False,
            tensor_parallel=cfg.parallel.tensor_model_parallel_size,
        ),
        teacher_cost(cfg, convention, layers=teacher_layer),
        regressor_flops_per_token(regressor_parameters(cfg)),
    )
    return hint, TokenCost(data_cost(cfg, convention), logit_teacher_cost(cfg, convention))


def hldf_cost_schedule(cfg: LETConfig, convention: Convention) -> CostSchedule:
    assert cfg.hld.phase1_iters is not None, "hld.phase1_iters is resolved (from phase1_fraction) first"
    hint, kd = hldf_phase_costs(cfg, convention)
    return CostSchedule(((0, hint), (cfg.hld.phase1_iters, kd)))


def hldf_phase1_iters(cfg: LETConfig, convention: Convention, budget: Optional[float]) -> int:
    """Phase 1's length from P1 = hld.phase1_fraction, the share of the run's FLOPs it gets (the
    paper's split): P1·budget / (its cost per step), or — with the run given in iterations T —
    the p solving p·c1 = P1·(p·c1 + (T − p)·c2)."""
    fraction = cfg.hld.phase1_fraction
    assert fraction is not None
    hint, kd = hldf_phase_costs(cfg, convention)
    tokens = cfg.training.global_batch_size * cfg.training.seq_length
    if budget is not None:
        return int(fraction * budget // (tokens * hint.total))
    iters = cfg.training.train_iters
    return round(fraction * iters * kd.total / ((1 - fraction) * hint.total + fraction * kd.total))
