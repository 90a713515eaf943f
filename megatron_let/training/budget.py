"""A run sized in FLOPs: ``training.flops_budget`` (a count, or ``OT_k``) → the iterations the
run's method can afford, counted by its own cost schedule (megatron_let.flops, per phase), so
methods compare at equal compute and a cheaper phase (HLDF's hint phase) buys more steps."""

from __future__ import annotations

from typing import Optional

from megatron_let.config import ConfigError, LETConfig, budget_overtraining_units
from megatron_let.model.gpt import count_parameters
from megatron_let.objectives import cost_schedule, set_budget_phases
from megatron_let.objectives.base import data_cost


def chinchilla_nll_flops(cfg: LETConfig) -> float:
    """OT_1: the student's Chinchilla-optimal NLL compute — chinchilla_tokens_per_parameter × N
    tokens (N: backbone parameters, as the compute-matched paper's OT_54 = 108B tokens for its
    ~100M-backbone student implies), each at C_data."""
    tokens = cfg.training.chinchilla_tokens_per_parameter * count_parameters(cfg.model)["non_embedding"]
    return tokens * data_cost(cfg, cfg.training.flops_convention)


def budget_flops(cfg: LETConfig) -> Optional[float]:
    """training.flops_budget in FLOPs (None: the run is sized by training.train_iters)."""
    budget = cfg.training.flops_budget
    if budget is None:
        return None
    where = getattr(cfg, "where", lambda key: "config")

    def bad(message: str):
        raise ConfigError(f"{where('training.flops_budget')}: training.flops_budget: {message}")

    units = budget_overtraining_units(budget, bad)
    return float(budget) if units is None else units * chinchilla_nll_flops(cfg)


def resolve_budget(cfg: LETConfig) -> Optional[str]:
    """Set training.train_iters from training.flops_budget (the most steps whose FLOPs stay
    within it) and hldf's phase 1 from hld.phase1_fraction; returns the start-up line saying so
    (None when there was nothing to resolve). Recomputes from the same keys each time, so it may
    run more than once."""
    where = getattr(cfg, "where", lambda key: "config")
    convention = cfg.training.flops_convention
    budget = budget_flops(cfg)
    set_budget_phases(cfg, convention, budget)
    phases = ""
    if cfg.objective == "hldf" and cfg.hld.phase1_fraction is not None:
        if cfg.hld.phase1_iters is None or cfg.hld.phase1_iters < 1:
            raise ConfigError(
                f"{where('hld.phase1_fraction')}: hld.phase1_fraction: P1 = {cfg.hld.phase1_fraction} of the run "
                "buys no phase-1 step: raise it or the run's size"
            )
        phases = f"; hldf phase 1: iterations 1–{cfg.hld.phase1_iters} (P1 = {cfg.hld.phase1_fraction} of its FLOPs)"
    if budget is None:
        return f"train_iters {cfg.training.train_iters}{phases}" if phases else None
    tokens = cfg.training.global_batch_size * cfg.training.seq_length
    schedule = cost_schedule(cfg, convention)
    iterations = schedule.iterations_within(budget, tokens)
    if iterations < 1:
        raise ConfigError(
            f"{where('training.flops_budget')}: training.flops_budget: {budget:.4g} FLOPs buys no step of "
            f"method {cfg.objective} ({tokens * schedule.at(0).total:.4g} FLOPs each)"
        )
    cfg.training.train_iters = iterations
    given = cfg.training.flops_budget
    units = f"{given} = " if isinstance(given, str) else ""
    return (
        f"training.flops_budget {units}{budget:.4g} FLOPs ({convention} convention) → train_iters {iterations} "
        f"for method {cfg.objective} ({tokens} tokens per step, {schedule.spent(iterations, tokens):.4g} FLOPs "
        f"spent){phases}"
    )
