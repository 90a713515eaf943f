"""Logit distillation as an objective: ``kd``, ``rkd`` and ``salt``.

The loss per token is the compute-matched paper's Eq. 2, ``(1 − α)·NLL + α·τ²·KL(p_T^τ ‖ p_S^τ)``
(or the reverse KL; the teacher's top-k renormalised by default; :mod:`megatron_let.distillation`
computes it on the vocab-parallel logits). ``rkd`` is the same loss from a teacher smaller than
the target (the LET paper's RKD baseline); ``salt`` (and any method with ``distillation.stop_step``)
distils for the steps before ``stop_step`` and trains on the NLL alone from there, the teacher
released — the LET paper's SALT baseline, without its data selection.

The teacher lives on the last pipeline stage only (where the student's logits are), tensor-
parallel over that stage's group when its heads divide TP. Other stages run the plain forward.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.utils import get_attr_wrapped_model

from megatron_let.config import LETConfig, TeacherConfig
from megatron_let.data.teacher_cache import TeacherCache
from megatron_let.distillation import gather_columns, kl_divergence, top_k_target
from megatron_let.flops import Convention, CostSchedule, TokenCost
from megatron_let.model.gpt import Kernels
from megatron_let.objectives.base import Objective, data_cost, until
from megatron_let.objectives.teacher import Teacher, load_teacher_weights, teacher_cost, teacher_model


class KDObjective(Objective):
    name = "kd"
    metric_keys: tuple[str, ...] = ("kd_loss",)
    metric_labels = {"kd_loss": "kd loss"}
    weight_label = "α"

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
        if cfg.teacher is None:
            raise ValueError(f"{cfg.objective} needs a teacher: give the config a teacher: section")
        self.cfg = cfg
        self.name = cfg.objective
        self.teacher_cfg: TeacherConfig = cfg.teacher
        self.distill = cfg.distillation
        self.device = device
        self.log = log
        self.teacher: Optional[Teacher] = None
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.reports = parallel_state.get_tensor_model_parallel_rank() == 0  # TP ranks hold the same KL
        self._sums = torch.zeros(2, dtype=torch.float64, device=device)  # Σ KL·mask, tokens
        self._measured = False
        self.present = self.distill.stop_step is None or iteration < self.distill.stop_step
        # The logits from a teacher cache (read on the last stage) instead of a teacher run there.
        self.cache: Optional[TeacherCache] = None
        if self.present and self.distill.teacher_cache and parallel_state.is_pipeline_last_stage(ignore_virtual=True):
            self.cache = TeacherCache(
                self.distill.teacher_cache, cfg, self.distill.top_k, key="distillation.teacher_cache"
            )
        if self.present and self._runs_a_teacher():
            if self._holds_teacher():
                self.teacher = Teacher(
                    self.teacher_cfg,
                    teacher_layer=None,
                    on_cpu=on_cpu,
                    use_te=use_te,
                    seed=cfg.training.seed + 1,
                    kernels=kernels,
                )
            load_teacher_weights(self.teacher_cfg, self.teacher, self.log)

    def _runs_a_teacher(self) -> bool:
        """Whether any rank runs the teacher (same answer on every rank)."""
        return not self.distill.teacher_cache

    def _holds_teacher(self) -> bool:
        """Whether this rank runs the teacher: on the last stage, where the student's logits are
        (unless they come from a cache)."""
        return parallel_state.is_pipeline_last_stage(ignore_virtual=True) and not self.distill.teacher_cache

    # ----------------------------------------------------------------------------- a step

    def begin_step(self, iteration: int) -> float:
        stop = self.distill.stop_step
        weight = self.distill.alpha if stop is None or iteration < stop else 0.0
        if self.present and stop is not None and iteration >= stop:
            self.release(iteration)
        return weight

    def forward(self, model_chunk, batch: dict, weight: float, evaluating: bool = False):
        source = self.teacher is not None or self.cache is not None
        if evaluating or not source or not get_attr_wrapped_model(model_chunk, "post_process"):
            return super().forward(model_chunk, batch, weight, evaluating)
        self.before_forward(model_chunk, batch, weight, evaluating)
        tokens, position_ids, mask = batch["tokens"], batch["position_ids"], batch.get("attention_mask")
        # No labels: megatron returns the logits, [b, s, V/TP]; its loss and ours read [s, b, V/TP].
        logits = model_chunk(tokens, position_ids, mask).transpose(0, 1).contiguous()
        tau = self.distill.temperature
        if self.cache is not None:
            values, indices = self.cache.lookup(batch["sample_index"], logits.device)  # [b, s, k]
            target = top_k_target(values.transpose(0, 1), indices.transpose(0, 1), tau, logits.shape[-1], self.tp_group)
            kl = kl_divergence(
                logits, tau=tau, vocab_size=self.cfg.model.vocab_size, target=target, group=self.tp_group
            )
        else:
            teacher_logits = self._in_student_columns(self._teacher_logits(batch), logits.shape[-1])
            kl = kl_divergence(
                logits,
                teacher_logits,
                tau=tau,
                vocab_size=self.cfg.model.vocab_size,
                top_k=self.distill.top_k,
                reverse=self.distill.reverse,
                group=self.tp_group,
            )
        kl = kl.transpose(0, 1)  # [b, s]
        # After the KL: megatron's vocab-parallel cross-entropy overwrites the logits in place.
        nll = get_attr_wrapped_model(model_chunk, "compute_language_model_loss")(batch["labels"], logits)  # [b, s]
        if self.reports:
            loss_mask = batch["loss_mask"].float()
            self._sums += torch.stack([(kl.detach() * loss_mask).sum(), loss_mask.sum()]).to(torch.float64)
            self._measured = True
        loss = (1 - weight) * nll + weight * tau**2 * kl
        return loss, nll

    def _teacher_logits(self, batch: dict) -> torch.Tensor:
        """The teacher's logits for this microbatch, [s, b, V_T / TP_T]."""
        assert self.teacher is not None
        return self.teacher.logits(batch["tokens"], batch["position_ids"], batch.get("attention_mask"))

    def _in_student_columns(self, teacher_logits: torch.Tensor, width: int) -> torch.Tensor:
        """The teacher's logits over the student's vocabulary columns on this rank. Both pad the
        same vocabulary (checked at start-up) but may split or pad it differently (a teacher
        replicated on each TP rank holds every column; another make_vocab_size_divisible_by pads
        it to another width): then the full row is assembled and this rank's slice taken, the
        padding beyond the teacher's columns filled with −inf (those columns are not tokens)."""
        tp = parallel_state.get_tensor_model_parallel_world_size()
        teacher_tp = self.teacher.layout.tensor_parallel if self.teacher else 1
        if teacher_tp == tp and teacher_logits.shape[-1] == width:
            return teacher_logits
        full = gather_columns(teacher_logits, self.tp_group) if teacher_tp > 1 else teacher_logits
        start = parallel_state.get_tensor_model_parallel_rank() * width
        mine = full[..., start : start + width]
        if mine.shape[-1] < width:
            pad = mine.new_full((*mine.shape[:-1], width - mine.shape[-1]), float("-inf"))
            mine = torch.cat([mine, pad], dim=-1)
        return mine

    def take_metric_sums(self) -> Optional[torch.Tensor]:
        if not self._measured:
            return None
        sums, self._sums = self._sums, torch.zeros_like(self._sums)
        self._measured = False
        return sums

    def release(self, iteration: int) -> None:
        """The KD term reached weight 0: the teacher is never needed again."""
        self.present = False
        self._drop_teacher()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        self.log(
            f"iteration {iteration + 1}: distillation ends (distillation.stop_step={self.distill.stop_step}); "
            "NLL only from here on, teacher released"
        )

    def _drop_teacher(self) -> None:
        if self.teacher is not None:
            self.teacher.release()
        self.teacher = None
        self.cache = None

    def close(self) -> None:
        self._drop_teacher()

    def describe(self) -> str:
        teacher = teacher_model(self.teacher_cfg)
        d = self.distill
        kl = "KL(p_S‖p_T)" if d.reverse else "KL(p_T‖p_S)"
        support = "whole vocabulary" if d.top_k is None else f"teacher top-{d.top_k} renormalised"
        until = f", until step {d.stop_step} (then NLL)" if d.stop_step is not None else ""
        return (
            f"{self.name}: (1 − {d.alpha})·NLL + {d.alpha}·τ²·{kl}, τ {d.temperature}, {support}{until}; teacher "
            f"{teacher.num_layers} layers × {teacher.hidden_size} on the last pipeline stage"
        )


def logit_teacher_cost(cfg: LETConfig, convention: Convention) -> float:
    """The teacher's whole forward with its output layer, per token; nothing when its logits are
    read from a cache (the compute-matched paper's C_Teacher ≈ 0: the cache was paid for once,
    off this run). The KL over the vocabulary (or top-k) is O(V) per token: not counted, as the
    paper does not (C_KD/C_data ≈ 1.0000)."""
    if cfg.distillation.teacher_cache:
        return 0.0
    return teacher_cost(cfg, convention, head=True)


def kd_cost_schedule(cfg: LETConfig, convention: Convention) -> CostSchedule:
    """C_KD = C_data + C_Teacher while the teacher runs (salt: until distillation.stop_step), then C_data."""
    data = data_cost(cfg, convention)
    return until(cfg.distillation.stop_step, TokenCost(data, logit_teacher_cost(cfg, convention)), TokenCost(data))
