"""``megatron-let benchmark``: LET's cost against plain pretraining, in the layout of the LET paper's Table 4.

Baseline and LET train the same model on the same data with the same seed, each run a fresh
process group (``python -m torch.distributed.run --nproc-per-node N -m megatron_let.train --config
FILE --set ...``), the order alternating across repeats (LET, baseline, baseline, LET, LET, ...) so
that slow drift of the machine (clocks, thermals, page cache) does not favour one of them. Every run
writes its own ``metrics.jsonl`` under ``--output-dir`` (``<output-dir>/<run>/metrics.jsonl``, the
trainer's output beside it in ``output.log``); the figures are computed from those files only.

What each run is given (``--set``, after the user's own ``--set`` values):
``training.train_iters`` = ``--train-iters``, ``alignment.stop_step`` = ``--stop-step`` (S_stop),
``logging.jsonl_path``, ``logging.log_interval`` = 1 (the trainer times a whole log interval and
gives each of its steps the interval's mean time and peak memory: at 1 every record is its own
step's, and no interval straddles the teacher release), ``checkpoint.save`` = ``checkpoint.load`` =
null (no saving, no resuming),
``eval.eval_interval`` = null and ``eval.test_at_end`` = false (unless the user sets them),
``logging.tensorboard_dir`` = null (idem), ``model.num_layers`` with ``--num-layers``,
``data.mock_data`` = true with ``--mock-data``. The baseline is the same command with
``alignment.enabled=false`` (the teacher is neither built nor run, no hook is registered and the
FLOPs count has no teacher term); LET is the same with ``alignment.enabled=true``.

How each figure is computed (records: the ``split == "train"`` lines of each ``metrics.jsonl``; the
trainer writes one per iteration, 1-based, with ``lambda``, ``step_time_s``, ``tokens_per_s``,
``tflops_per_gpu`` and, on GPU, ``peak_memory_allocated_gib`` / ``peak_memory_reserved_gib``):

* **Iterations of each phase** come from the LET run's λ (all LET repeats must agree):
  *during alignment* = iterations with λ > 0; the *release iteration* = the first iteration with
  λ = 0 (iteration S_stop + 1, the step at which the teacher is freed); *after S_stop* = iterations
  with λ = 0 after the release iteration. Iterations 1..``--warmup`` are dropped from both phases,
  and the release iteration is dropped from "after". The baseline's figures for a phase are taken
  over the *same iteration numbers* of the baseline runs.
* **step time**: the median of ``step_time_s`` over the phase's iterations of all repeats of a
  variant, pooled; the spread is the inter-quartile range (25th–75th percentile,
  ``statistics.quantiles(method="inclusive")``) and the min–max of the same pooled values. The
  median of each repeat alone is kept in the JSON (``per_repeat_median``).
* **tokens/s** and **TFLOP/s per GPU**: the median (and spread) of the records' ``tokens_per_s``
  and ``tflops_per_gpu`` over the same pooled iterations. The trainer computes them per step as
  global_batch × seq_length / step time and (model FLOPs of the step, LET's teacher forward
  included while λ > 0) / step time / world size.
* **peak memory allocated / reserved** (GiB): the maximum of the records' values over the phase's
  iterations of all repeats (the trainer reports ``torch.cuda.max_memory_allocated`` /
  ``max_memory_reserved``, maximum over ranks, since its last reset: after each log interval, i.e.
  each step here, and at the teacher release); "n/a" when the records lack the field (CPU).
* **ratios**: *throughput* = baseline median step time / LET median step time (1.00 = no cost,
  0.97 = LET runs 3 % fewer steps per second); *tokens/s* and *TFLOP/s per GPU* = LET median /
  baseline median; *memory* = LET peak / baseline peak (≤ 1 = no more memory than the baseline).
* **run-averaged** over T iterations of which S align (measured: T = ``--train-iters``, S = the
  number of λ > 0 iterations; projected: ``--project-train-iters`` and ``--project-stop-step``):
  per variant, step time t = (S·t_during + (T − S)·t_after) / T with t_phase the phase's median
  step time (the time-weighted average of the two phases: what T iterations cost, divided by T;
  warm-up and release iterations are represented by the phases' medians); tokens/s = tokens per
  step / t (tokens per step = the median of ``tokens_per_s × step_time_s``); TFLOP/s per GPU =
  (S·F_during + (T − S)·F_after) / (T·t), with F_phase = the median of ``tflops_per_gpu ×
  step_time_s`` (TFLOP per GPU per step); peak memory = the larger of the two phases' peaks. The
  ratios are formed from these as above. No spread is given for run-averaged figures.
* **extrapolation** (``--num-layers`` with two or more depths, e.g. the 7B width at 4 and 8 layers):
  for each phase and variant, a least-squares line a + b·L through (L, median step time), and
  likewise through the TFLOP per GPU per step and the peak memories, evaluated at the full depth
  (``--extrapolate-to``, default the config's ``model.num_layers``); b is printed as the per-layer
  cost. Tokens per step do not depend on L. These rows are labelled EXTRAPOLATION: they are not
  measurements.

**Every objective** (``--methods nll,let,kd,rkd,salt,hldc,hldf``, any subset holding ``nll``, the
reference): the same machinery runs one process group per listed method instead of the two
variants, the same command with, after the settings above (``alignment.stop_step`` and
``alignment.enabled`` aside), ``method`` = the method and ``alignment.enabled`` = true for ``let``,
false for the others; each method is kept in its costly phase for the whole run:
``let``: ``alignment.stop_step`` = ``--train-iters`` + 1 (λ > 0 and the teacher runs at every
iteration; the benchmark checks the records' λ); ``salt``: ``distillation.stop_step`` =
``--train-iters`` + 1 (KD at every iteration); ``kd``, ``rkd``, ``hldc``: ``distillation.stop_step`` =
null (no switch to NLL); ``hldf``: ``hld.phase1_iters`` = ``--train-iters`` + 1 with
``hld.phase1_fraction`` = null and ``distillation.stop_step`` = null, labelled "hldf (phase 1)" (its
phase 2 costs what kd costs). ``--stop-step`` is not used. Each repeat runs every method once,
round-robin, the starting method rotating by one per repeat (nll, kd, hldf; kd, hldf, nll; ...).
The figures of a method are those of a phase above (``summary``, the same pooling), over iterations
``--warmup`` + 1 .. ``--train-iters`` of all its repeats: median step time with IQR and min–max,
tokens/s, TFLOP/s per GPU, peak memory allocated / reserved; the ratios are formed against nll as
above with nll as the baseline (*throughput* = nll median step time / the method's; *tokens/s*,
*TFLOP/s per GPU* = method / nll; *memory* = method peak / nll peak). Beside them, the accounting's
count: the run's config loaded with the run's own ``--set`` values
(``megatron_let.run_config.load_run_config``) and ``megatron_let.objectives.cost_schedule(cfg,
convention).at(0)``, the FLOPs per token of the first step (student, teacher, regressor and their
total) in both conventions, ``paper`` (the compute-matched paper's A.9) and ``megatron``
(Megatron-LM's, the one the TFLOP/s are counted in), and each total / nll's total ("counted FLOPs
ratio to nll"): measured time and counted compute side by side. The JSON holds them under
``"methods"``; ``--num-layers`` takes one depth there, and the projection flags are refused.

The teacher: if the config reads it from a checkpoint that does not exist on this machine (e.g. a
benchmark of the 1.4B shape before any conversion), give its shape instead, e.g.
``--set teacher.load=null --set teacher.model.num_layers=30 --set teacher.model.hidden_size=576 ...``
(random weights cost what trained ones cost).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence, get_args

import yaml

from megatron_let.config import Method

REPO = Path(__file__).resolve().parents[2]

PHASES = ("during", "after", "run_averaged")
PHASE_TITLES = {
    "during": "during alignment",
    "after": "after S_stop",
    "run_averaged": "run-averaged",
    "run_averaged_projected": "run-averaged, projected",
}
SERIES = ("step_time_s", "tokens_per_s", "tflops_per_gpu")
MEMORY = ("peak_memory_allocated_gib", "peak_memory_reserved_gib")
VARIANTS = ("baseline", "let")
LABELS = {"baseline": "baseline", "let": "LET"}

# --methods: every objective in its costly phase, against nll (see the module docstring).
METHODS = tuple(get_args(Method))
REFERENCE = "nll"
METHOD_LABELS = {"hldf": "hldf (phase 1)"}  # hldf runs phase 1 throughout; its phase 2 costs what kd costs
# Keys --methods sets itself for some methods (on top of _RESERVED).
_RESERVED_METHODS = {
    "method": "--methods",
    "alignment.enabled": "(--methods: true for let only)",
    "alignment.stop_step": "(--methods keeps let aligning for the whole run)",
    "distillation.stop_step": "(--methods keeps every method in its costly phase)",
    "hld.phase1_iters": "(--methods keeps hldf in phase 1)",
    "hld.phase1_fraction": "(--methods keeps hldf in phase 1)",
}

# Keys the benchmark sets itself (the corresponding flag says how to change them).
_RESERVED = {
    "training.train_iters": "--train-iters",
    "alignment.stop_step": "--stop-step",
    "alignment.enabled": "(the benchmark runs both)",
    "logging.jsonl_path": "--output-dir",
    "checkpoint.save": "(runs never save)",
    "checkpoint.load": "(runs never resume)",
    "logging.log_interval": "(1: each record must be its own step's time and peak memory)",
}


class BenchmarkError(RuntimeError):
    """A run failed, or its records cannot be compared. The message names the run."""


# ------------------------------------------------------------------------------------ statistics


def summary(values: Sequence[float]) -> Optional[dict]:
    """Median, quartiles (inclusive method), min, max and count; None for no values."""
    values = [float(v) for v in values]
    if not values:
        return None
    if len(values) >= 2:
        p25, _, p75 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        p25 = p75 = values[0]
    return {
        "n": len(values),
        "median": statistics.median(values),
        "p25": p25,
        "p75": p75,
        "min": min(values),
        "max": max(values),
    }


def read_train_records(path: str | Path) -> list[dict]:
    """The ``split == "train"`` records of a metrics.jsonl, by iteration (a torn last line is ignored)."""
    records = {}
    for line in Path(path).read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("split", "train") == "train" and "iteration" in record:
            records[int(record["iteration"])] = record
    return [records[i] for i in sorted(records)]


def split_phases(let_runs: Sequence[Sequence[dict]], warmup: int) -> dict:
    """Iterations of each phase, from the LET runs' λ (see the module docstring)."""
    schedules = [{r["iteration"]: float(r.get("lambda") or 0.0) for r in run} for run in let_runs]
    if not schedules or not schedules[0]:
        raise BenchmarkError("the LET run wrote no train records")
    for other in schedules[1:]:
        if other != schedules[0]:
            raise BenchmarkError("the LET repeats disagree on λ per iteration")
    schedule = schedules[0]
    aligned = sorted(i for i, lam in schedule.items() if lam > 0)
    if not aligned:
        raise BenchmarkError(
            "the LET run never aligned (λ = 0 at every iteration): does the config have a "
            "teacher, and alignment.lambda0 > 0?"
        )
    release = min((i for i, lam in schedule.items() if lam == 0 and i > aligned[-1]), default=None)
    after = sorted(i for i, lam in schedule.items() if lam == 0 and release is not None and i > release)
    return {
        "during": [i for i in aligned if i > warmup],
        "after": [i for i in after if i > warmup],
        "release_iteration": release,
        "aligned_iterations": len(aligned),
        "train_iters": max(schedule),
    }


def _variant_phase(runs: Sequence[Sequence[dict]], iterations: Sequence[int], variant: str) -> dict:
    wanted = set(iterations)
    pooled: list[dict] = []
    per_repeat = []
    for index, run in enumerate(runs):
        chosen = [r for r in run if r["iteration"] in wanted]
        missing = wanted - {r["iteration"] for r in chosen}
        if missing:
            raise BenchmarkError(
                f"{LABELS.get(variant, variant)} repeat {index + 1} has no record of iteration(s) {sorted(missing)[:5]}"
            )
        pooled += chosen
        per_repeat.append(statistics.median(r["step_time_s"] for r in chosen) if chosen else None)
    out: dict = {name: summary([r[name] for r in pooled]) for name in SERIES}
    out["per_repeat_median_step_time_s"] = per_repeat
    for name in MEMORY:
        values = [r[name] for r in pooled if r.get(name) is not None]
        out[name] = max(values) if values else None
    out["tokens_per_step"] = statistics.median(r["tokens_per_s"] * r["step_time_s"] for r in pooled) if pooled else None
    out["tflop_per_gpu_per_step"] = (
        statistics.median(r["tflops_per_gpu"] * r["step_time_s"] for r in pooled) if pooled else None
    )
    return out


def _median(stats: Optional[dict]) -> Optional[float]:
    return None if stats is None else stats["median"]


def _ratio(numerator: Optional[float], denominator: Optional[float]) -> Optional[float]:
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _ratios(base: dict, let: dict) -> dict:
    return {
        "throughput": _ratio(_median(base["step_time_s"]), _median(let["step_time_s"])),
        "tokens_per_s": _ratio(_median(let["tokens_per_s"]), _median(base["tokens_per_s"])),
        "tflops_per_gpu": _ratio(_median(let["tflops_per_gpu"]), _median(base["tflops_per_gpu"])),
        "peak_memory_allocated": _ratio(let["peak_memory_allocated_gib"], base["peak_memory_allocated_gib"]),
        "peak_memory_reserved": _ratio(let["peak_memory_reserved_gib"], base["peak_memory_reserved_gib"]),
    }


def _point(value: Optional[float]) -> Optional[dict]:
    """A figure without spread, in the shape of :func:`summary` (for run-averaged and extrapolated rows)."""
    return None if value is None else {"n": None, "median": value, "p25": None, "p75": None, "min": None, "max": None}


def run_average(during: dict, after: dict, train_iters: int, stop_step: int) -> dict:
    """The time-weighted combination of one variant's two phases over ``train_iters`` iterations,
    ``stop_step`` of which align (see the module docstring)."""
    s = max(0, min(stop_step, train_iters))
    parts = [(s, during), (train_iters - s, after)]
    parts = [(count, phase) for count, phase in parts if count > 0]
    time_ = flop = 0.0
    ok = train_iters > 0
    for count, phase in parts:
        t, f = _median(phase["step_time_s"]), phase["tflop_per_gpu_per_step"]
        if t is None or f is None:
            ok = False
            break
        time_ += count * t
        flop += count * f
    tokens = next((p["tokens_per_step"] for _, p in parts if p["tokens_per_step"] is not None), None)
    step_time = time_ / train_iters if ok else None
    out = {
        "step_time_s": _point(step_time),
        "tokens_per_s": _point(tokens / step_time if ok and tokens is not None and step_time else None),
        "tflops_per_gpu": _point(flop / time_ if ok and time_ else None),
        "per_repeat_median_step_time_s": None,
        "tokens_per_step": tokens,
        "tflop_per_gpu_per_step": flop / train_iters if ok else None,
    }
    for name in MEMORY:
        values = [p[name] for _, p in parts]
        out[name] = None if not values or any(v is None for v in values) else max(values)
    return out


def _run_averaged(phases: dict, train_iters: int, stop_step: int) -> dict:
    combined: dict = {v: run_average(phases["during"][v], phases["after"][v], train_iters, stop_step) for v in VARIANTS}
    combined["ratios"] = _ratios(combined["baseline"], combined["let"])
    combined["train_iters"], combined["stop_step"] = train_iters, stop_step
    return combined


def analyse(
    let_runs: Sequence[Sequence[dict]],
    baseline_runs: Sequence[Sequence[dict]],
    warmup: int,
    projection: Optional[tuple[int, int]] = None,
) -> dict:
    """Table-4 figures from the train records of the LET and baseline repeats.

    Returns ``{"during": ..., "after": ..., "run_averaged": ..., ["run_averaged_projected": ...,]
    "iterations": {...}}``; each phase holds ``baseline``, ``let`` (per-variant figures) and
    ``ratios``. ``projection``: (train_iters, stop_step) for the projected run average.
    """
    split = split_phases(let_runs, warmup)
    result: dict = {"iterations": split}
    for phase in ("during", "after"):
        entry = {
            "baseline": _variant_phase(baseline_runs, split[phase], "baseline"),
            "let": _variant_phase(let_runs, split[phase], "let"),
        }
        entry["ratios"] = _ratios(entry["baseline"], entry["let"])
        entry["iterations"] = split[phase]
        result[phase] = entry
    result["run_averaged"] = _run_averaged(result, split["train_iters"], split["aligned_iterations"])
    if projection is not None:
        result["run_averaged_projected"] = _run_averaged(result, *projection)
    return result


def analyse_methods(runs: dict[str, Sequence[Sequence[dict]]], warmup: int, train_iters: int) -> dict:
    """--methods: each method's figures over iterations ``warmup`` + 1 .. ``train_iters`` of its
    repeats (``runs``: method → the train records of each repeat), pooled as for a phase, with
    ratios to nll's (see the module docstring)."""
    if REFERENCE not in runs:
        raise BenchmarkError(f"--methods: no {REFERENCE} run to compare with")
    for index, records in enumerate(runs.get("let", ())):
        idle = [r["iteration"] for r in records if not float(r.get("lambda") or 0.0) > 0]
        if idle:
            raise BenchmarkError(
                f"let repeat {index + 1} did not align at iteration(s) {idle[:5]} (λ = 0): does the "
                "config have a teacher, and alignment.lambda0 > 0?"
            )
    iterations = list(range(warmup + 1, train_iters + 1))
    per_method = {method: _variant_phase(repeats, iterations, method_label(method)) for method, repeats in runs.items()}
    for method, entry in per_method.items():
        entry["label"] = method_label(method)
        entry["ratios"] = _ratios(per_method[REFERENCE], entry)
    return {"reference": REFERENCE, "iterations": iterations, "per_method": per_method}


def counted_flops(config: str, sets: Sequence[str]) -> dict:
    """FLOPs per token of the first step of the run that ``config`` with ``sets`` describes, by
    part, in both conventions (``objectives.cost_schedule``)."""
    from megatron_let.flops import Convention
    from megatron_let.objectives import cost_schedule
    from megatron_let.run_config import load_run_config

    cfg = load_run_config(config, list(sets))
    conventions: tuple[Convention, ...] = ("paper", "megatron")
    out = {}
    for convention in conventions:
        cost = cost_schedule(cfg, convention).at(0)
        out[convention] = {
            "student": cost.student,
            "teacher": cost.teacher,
            "regressor": cost.regressor,
            "total": cost.total,
        }
    return out


def _fit(xs: Sequence[float], ys: Sequence[Optional[float]]) -> Optional[tuple[float, float]]:
    """Least-squares (intercept, slope) of y over x; None if any y is missing or x does not vary."""
    if any(y is None for y in ys) or len(set(xs)) < 2:
        return None
    known = [float(y) for y in ys if y is not None]
    mx, my = statistics.fmean(xs), statistics.fmean(known)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, known)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def extrapolate(by_layers: dict[int, dict], target_layers: int, projection: Optional[tuple[int, int]] = None) -> dict:
    """Per-layer linear extrapolation of the during/after figures of several depths to ``target_layers``."""
    depths = sorted(by_layers)
    result: dict = {"from_layers": depths, "to_layers": target_layers, "per_layer": {}}
    for phase in ("during", "after"):
        entry: dict = {}
        per_layer: dict = {}
        for variant in VARIANTS:
            figures = [by_layers[d][phase][variant] for d in depths]
            fits = {
                "step_time_s": _fit(depths, [_median(f["step_time_s"]) for f in figures]),
                "tflop_per_gpu_per_step": _fit(depths, [f["tflop_per_gpu_per_step"] for f in figures]),
            }
            for name in MEMORY:
                fits[name] = _fit(depths, [f[name] for f in figures])
            value = {k: (None if fit is None else fit[0] + fit[1] * target_layers) for k, fit in fits.items()}
            tokens = next((f["tokens_per_step"] for f in figures if f["tokens_per_step"] is not None), None)
            t = value["step_time_s"]
            entry[variant] = {
                "step_time_s": _point(t),
                "tokens_per_s": _point(tokens / t if tokens is not None and t else None),
                "tflops_per_gpu": _point(
                    value["tflop_per_gpu_per_step"] / t if value["tflop_per_gpu_per_step"] is not None and t else None
                ),
                "per_repeat_median_step_time_s": None,
                "tokens_per_step": tokens,
                "tflop_per_gpu_per_step": value["tflop_per_gpu_per_step"],
                **{name: value[name] for name in MEMORY},
            }
            per_layer[variant] = {
                k: (None if fit is None else {"fixed": fit[0], "per_layer": fit[1]}) for k, fit in fits.items()
            }
        entry["ratios"] = _ratios(entry["baseline"], entry["let"])
        result[phase] = entry
        result["per_layer"][phase] = per_layer
    measured = by_layers[depths[0]]["run_averaged"]
    result["run_averaged"] = _run_averaged(result, measured["train_iters"], measured["stop_step"])
    if projection is not None:
        result["run_averaged_projected"] = _run_averaged(result, *projection)
    return result


# ------------------------------------------------------------------------------------ running


@dataclass
class Run:
    variant: str  # baseline | let; with --methods, the method
    repeat: int  # 0-based
    num_layers: Optional[int]
    directory: Path
    returncode: Optional[int] = None
    wall_s: Optional[float] = None
    records: list = field(default_factory=list)
    method: Optional[str] = None  # --methods: the method this run trains with

    @property
    def name(self) -> str:
        depth = f"_L{self.num_layers}" if self.num_layers is not None else ""
        return f"{self.variant}{depth}_r{self.repeat + 1}"

    def label(self, repeats: int) -> str:
        depth = f", {self.num_layers} layers" if self.num_layers is not None else ""
        text = method_label(self.method) if self.method is not None else LABELS[self.variant]
        return f"{text} (repeat {self.repeat + 1}/{repeats}{depth})"

    @property
    def metrics_path(self) -> Path:
        return self.directory / "metrics.jsonl"

    @property
    def log_path(self) -> Path:
        return self.directory / "output.log"


def run_order(repeats: int) -> list[str]:
    """LET, baseline, baseline, LET, LET, baseline, ...: each variant goes first in half the pairs."""
    order = []
    for repeat in range(repeats):
        order += ["let", "baseline"] if repeat % 2 == 0 else ["baseline", "let"]
    return order


def method_order(methods: Sequence[str], repeats: int) -> list[str]:
    """Each repeat runs every method once, round-robin, starting one method further on each repeat."""
    order: list[str] = []
    for repeat in range(repeats):
        start = repeat % len(methods)
        order += list(methods[start:]) + list(methods[:start])
    return order


def method_label(method: str) -> str:
    return METHOD_LABELS.get(method, method)


def _method_sets(method: str, train_iters: int) -> list[str]:
    """What keeps ``method`` in its costly phase for ``train_iters`` iterations (module docstring)."""
    sets = [f"method={method}", f"alignment.enabled={'true' if method == 'let' else 'false'}"]
    beyond = train_iters + 1
    if method == "let":
        sets.append(f"alignment.stop_step={beyond}")
    elif method == "salt":
        sets.append(f"distillation.stop_step={beyond}")
    elif method == "hldf":
        sets += ["distillation.stop_step=null", f"hld.phase1_iters={beyond}", "hld.phase1_fraction=null"]
    elif method != REFERENCE:
        sets.append("distillation.stop_step=null")
    return sets


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(args: argparse.Namespace, run: Run) -> list[str]:
    """The ``--set`` assignments of one run: defaults the user may change, the user's, then the benchmark's."""
    sets = ["eval.eval_interval=null", "eval.test_at_end=false", "logging.tensorboard_dir=null"]
    sets += list(args.set)
    if run.method is not None:
        sets += [f"training.train_iters={args.train_iters}", *_method_sets(run.method, args.train_iters)]
    else:
        sets += [
            f"training.train_iters={args.train_iters}",
            f"alignment.stop_step={args.stop_step}",
            f"alignment.enabled={'true' if run.variant == 'let' else 'false'}",
        ]
    sets += [
        f"logging.jsonl_path={run.metrics_path.resolve()}",
        "logging.log_interval=1",
        "checkpoint.save=null",
        "checkpoint.load=null",
    ]
    if args.sync_debug:
        # Within the warm-up, which the figures exclude: the debug mode slows that step down.
        sets.append(f"logging.sync_debug_iteration={max(1, args.warmup)}")
    if run.num_layers is not None:
        sets.append(f"model.num_layers={run.num_layers}")
    if args.mock_data:
        sets.append("data.mock_data=true")
    return sets


def command(args: argparse.Namespace, run: Run) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc-per-node={args.nproc_per_node}",
        "--nnodes=1",
        f"--master-port={_free_port()}",
        "-m",
        "megatron_let.train",
        "--config",
        args.config,
    ]
    for assignment in overrides(args, run):
        cmd += ["--set", assignment]
    return cmd


def _tail(path: Path, lines: int = 40) -> str:
    """The last lines of a run's output before torchrun's own report of the failure (its
    ChildFailedError traceback says nothing about the cause)."""
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return "(no output)"
    for index, line in enumerate(text):
        if "torch/distributed/elastic/multiprocessing/api.py" in line and "failed (exitcode" in line:
            text = text[:index] + ["(torchrun's own traceback follows in the log)"]
            break
    return "\n".join(text[-lines:]) or "(no output)"


def execute(args: argparse.Namespace, run: Run, index: int, total: int) -> None:
    """Run one training process group; raise BenchmarkError naming the run if it fails."""
    label = run.label(args.repeats)
    if run.directory.exists():
        for stale in (run.metrics_path, run.log_path):
            stale.unlink(missing_ok=True)
    run.directory.mkdir(parents=True, exist_ok=True)
    cmd = command(args, run)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    progress(f"[{index}/{total}] starting {label} → {run.directory}")
    progress("    " + " ".join(cmd))
    start = time.monotonic()
    with open(run.log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            run.returncode = proc.wait(timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            _kill(proc)
            raise BenchmarkError(
                f"run {label} timed out after {args.run_timeout} s; last lines of "
                f"{run.log_path}:\n{_tail(run.log_path)}"
            ) from None
        except BaseException:
            _kill(proc)
            raise
    run.wall_s = time.monotonic() - start
    progress(f"[{index}/{total}] {label}: exit status {run.returncode} after {run.wall_s:.1f} s")
    if run.returncode != 0:
        raise BenchmarkError(
            f"run {label} failed with exit status {run.returncode}; last lines of "
            f"{run.log_path}:\n{_tail(run.log_path)}"
        )
    if not run.metrics_path.exists():
        raise BenchmarkError(
            f"run {label} exited 0 but wrote no {run.metrics_path}; last lines of "
            f"{run.log_path}:\n{_tail(run.log_path)}"
        )
    run.records = read_train_records(run.metrics_path)
    iterations = [r["iteration"] for r in run.records]
    if iterations != list(range(1, args.train_iters + 1)):
        raise BenchmarkError(
            f"run {label} recorded iterations {iterations[:3]}...{iterations[-3:]} in "
            f"{run.metrics_path}, expected 1..{args.train_iters}; last lines of "
            f"{run.log_path}:\n{_tail(run.log_path)}"
        )


def _kill(proc: subprocess.Popen) -> None:
    """Stop the launcher and its workers (their own process group)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def progress(message: str) -> None:
    print(f"[benchmark {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------------ the table


def _fmt(value: Optional[float], digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if value == 0 or 1e-3 <= abs(value) < 1e6:
        return f"{value:.{digits}g}" if abs(value) < 10**digits else f"{value:.0f}"
    return f"{value:.{digits - 1}e}"


def _with_spread(stats: Optional[dict]) -> str:
    if stats is None:
        return "n/a"
    text = _fmt(stats["median"])
    if stats.get("p25") is not None and stats.get("n", 0) > 1:
        text += f"  [IQR {_fmt(stats['p25'])}–{_fmt(stats['p75'])}, range {_fmt(stats['min'])}–{_fmt(stats['max'])}]"
    return text


def _ratio_text(value: Optional[float]) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def phase_rows(entry: dict, kind: str = "median") -> list[list[str]]:
    """``kind``: how the rows' figures were formed ("median", "time-weighted", "extrapolated")."""
    base, let, ratios = entry["baseline"], entry["let"], entry["ratios"]
    return [
        [
            f"step time, s ({kind})",
            _with_spread(base["step_time_s"]),
            _with_spread(let["step_time_s"]),
            f"throughput {_ratio_text(ratios['throughput'])}",
        ],
        [
            f"tokens/s ({kind})",
            _with_spread(base["tokens_per_s"]),
            _with_spread(let["tokens_per_s"]),
            _ratio_text(ratios["tokens_per_s"]),
        ],
        [
            f"TFLOP/s per GPU ({kind})",
            _with_spread(base["tflops_per_gpu"]),
            _with_spread(let["tflops_per_gpu"]),
            _ratio_text(ratios["tflops_per_gpu"]),
        ],
        [
            "peak memory allocated, GiB",
            _fmt(base["peak_memory_allocated_gib"]),
            _fmt(let["peak_memory_allocated_gib"]),
            _ratio_text(ratios["peak_memory_allocated"]),
        ],
        [
            "peak memory reserved, GiB",
            _fmt(base["peak_memory_reserved_gib"]),
            _fmt(let["peak_memory_reserved_gib"]),
            _ratio_text(ratios["peak_memory_reserved"]),
        ],
    ]


def _span(iterations: Sequence[int]) -> str:
    if not iterations:
        return "none"
    return f"{iterations[0]}–{iterations[-1]}" if len(iterations) > 1 else f"{iterations[0]}"


def phase_heading(phase: str, entry: dict, repeats: Optional[int], prefix: str = "") -> str:
    title = prefix + PHASE_TITLES[phase]
    if phase in ("during", "after"):
        its = entry.get("iterations", [])
        if repeats is None:
            return f"{title}"
        return f"{title} — iterations {_span(its)} ({len(its)} per run × {repeats} repeat(s))"
    return f"{title} — T = {entry['train_iters']} iterations, S_stop = {entry['stop_step']}"


def format_block(result: dict, repeats: Optional[int], prefix: str = "") -> list[str]:
    header = ["", "baseline", "LET", "LET vs baseline"]
    lines = []
    for phase in ("during", "after", "run_averaged", "run_averaged_projected"):
        if phase not in result:
            continue
        entry = result[phase]
        if prefix:
            kind = "extrapolated"
        else:
            kind = "median" if phase in ("during", "after") else "time-weighted"
        rows = [header] + phase_rows(entry, kind)
        widths = [max(len(row[c]) for row in rows) for c in range(4)]
        lines.append("")
        lines.append(phase_heading(phase, entry, repeats, prefix))
        for row in rows:
            lines.append("  " + "   ".join(cell.ljust(widths[c]) for c, cell in enumerate(row)).rstrip())
    return lines


def _host_sync_lines(report: dict) -> list[str]:
    syncs = [(run["name"], run["host_syncs"]) for run in report["runs"] if run.get("host_syncs") is not None]
    if not syncs:
        return []
    return [
        "",
        "host-device synchronisations in one step (CUDA sync debug mode; call sites in each "
        "run's output.log): " + ", ".join(f"{name} {count}" for name, count in syncs),
    ]


def format_report(report: dict) -> str:
    if "methods" in report:
        return format_methods_report(report)
    setup = report["setup"]
    lines = [
        "",
        f"LET vs baseline (Table-4 layout) — {setup['config']}, {setup['nproc_per_node']} process(es), "
        f"{setup['train_iters']} iterations, S_stop {setup['stop_step']}, warm-up {setup['warmup']}, "
        f"{setup['repeats']} repeat(s)",
        "throughput = baseline median step time / LET median step time; the other ratios are LET / baseline; "
        "spread: inter-quartile range and range over iterations × repeats",
    ]
    for entry in report["results"]:
        depth = entry["num_layers"]
        if depth is not None:
            lines += ["", f"=== target with {depth} layers (measured) ==="]
        release = entry["phases"]["iterations"]["release_iteration"]
        warm = {0: "no warm-up iterations", 1: "iteration 1 is warm-up (excluded)"}.get(
            setup["warmup"], f"iterations 1–{setup['warmup']} are warm-up (excluded)"
        )
        if release is not None:
            lines.append(f"teacher released at iteration {release} (excluded from 'after S_stop'); {warm}")
        else:
            lines.append(f"the teacher is never released within {setup['train_iters']} iterations; {warm}")
        lines += format_block(entry["phases"], setup["repeats"])
    lines += _host_sync_lines(report)
    extra = report.get("extrapolation")
    if extra:
        depths = ", ".join(map(str, extra["from_layers"]))
        lines += [
            "",
            f"=== EXTRAPOLATION (not measured): a per-layer linear fit through {depths} layers, "
            f"evaluated at {extra['to_layers']} layers ===",
        ]
        for phase in ("during", "after"):
            for variant in VARIANTS:
                fit = extra["per_layer"][phase][variant]["step_time_s"]
                if fit is not None:
                    sign = "+" if fit["per_layer"] >= 0 else "−"
                    lines.append(
                        f"  {PHASE_TITLES[phase]}, {LABELS[variant]}: step time ≈ {_fmt(fit['fixed'])} s "
                        f"{sign} {_fmt(abs(fit['per_layer']))} s per layer"
                    )
        lines += format_block(extra, None, prefix="EXTRAPOLATION: ")
    return "\n".join(lines)


def _spread_cells(stats: Optional[dict]) -> tuple[str, str, str]:
    """median, IQR, min–max of a :func:`summary` as three cells."""
    if stats is None:
        return "n/a", "n/a", "n/a"
    return (
        _fmt(stats["median"]),
        f"{_fmt(stats['p25'])}–{_fmt(stats['p75'])}",
        f"{_fmt(stats['min'])}–{_fmt(stats['max'])}",
    )


METHOD_ROWS = (
    ("step_time_s", "step time, s"),
    ("tokens_per_s", "tokens/s"),
    ("tflops_per_gpu", "TFLOP/s per GPU"),
)
CONVENTION_TITLES = {"paper": "paper A.9", "megatron": "Megatron-LM"}


def method_rows(result: dict) -> list[list[str]]:
    """--methods: one row per figure, one column per method (the header first)."""
    per_method = result["per_method"]
    entries = list(per_method.values())
    rows = [[""] + [entry["label"] for entry in entries]]
    for key, title in METHOD_ROWS:
        cells = [_spread_cells(entry[key]) for entry in entries]
        rows.append([f"{title} (median)"] + [c[0] for c in cells])
        rows.append(["  IQR"] + [c[1] for c in cells])
        rows.append(["  min–max"] + [c[2] for c in cells])
    for key in MEMORY:
        title = key.removesuffix("_gib").replace("_", " ") + ", GiB"
        rows.append([title] + [_fmt(entry[key]) for entry in entries])
    for key, title in (
        ("throughput", f"throughput ({REFERENCE} step time / method's)"),
        ("tokens_per_s", f"tokens/s ratio to {REFERENCE}"),
        ("tflops_per_gpu", f"TFLOP/s per GPU ratio to {REFERENCE}"),
        ("peak_memory_allocated", f"peak memory allocated ratio to {REFERENCE}"),
        ("peak_memory_reserved", f"peak memory reserved ratio to {REFERENCE}"),
    ):
        rows.append([title] + [_ratio_text(entry["ratios"][key]) for entry in entries])
    for convention, title in CONVENTION_TITLES.items():
        rows.append([f"FLOPs/token ({title})"] + [f"{e['flops_per_token'][convention]['total']:.4g}" for e in entries])
    for convention, title in CONVENTION_TITLES.items():
        rows.append(
            [f"counted FLOPs ratio to {REFERENCE} ({title})"]
            + [_ratio_text(e["counted_flops_ratio"][convention]) for e in entries]
        )
    return rows


def format_methods_report(report: dict) -> str:
    setup, result = report["setup"], report["methods"]
    its = result["iterations"]
    depth = f", {setup['num_layers']} layers" if setup.get("num_layers") is not None else ""
    lines = [
        "",
        f"every objective vs {REFERENCE} (Table-4 layout) — {setup['config']}{depth}, "
        f"{setup['nproc_per_node']} process(es), {setup['train_iters']} iterations, warm-up {setup['warmup']}, "
        f"{setup['repeats']} repeat(s)",
        "each method in its costly phase at every iteration (let aligns, salt and the other logit methods "
        "distil, hldf is in phase 1); "
        f"iterations {_span(its)} ({len(its)} per run × {setup['repeats']} repeat(s)), pooled",
        f"throughput = {REFERENCE} median step time / the method's; the other ratios are method / {REFERENCE}; "
        "FLOPs/token: the accounting's count for the first step (objectives.cost_schedule), "
        "the TFLOP/s are counted in Megatron-LM's",
        "",
    ]
    rows = method_rows(result)
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        lines.append("  " + "   ".join(cell.ljust(widths[c]) for c, cell in enumerate(row)).rstrip())
    lines += _host_sync_lines(report)
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ main


def _raw_config(path: str, sets: Sequence[str]) -> dict:
    """The config file's keys with the user's ``--set`` values applied (no validation)."""
    try:
        raw = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise BenchmarkError(f"--config {path}: {err}") from None
    for assignment in sets:
        key, _, text = assignment.partition("=")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                node[part] = {}
            node = node[part]
        node[parts[-1]] = yaml.safe_load(text)
    return raw


def _lookup(raw: dict, dotted: str, default=None):
    node = raw
    for part in dotted.split("."):
        if not isinstance(node, dict) or node.get(part) is None:
            return default
        node = node[part]
    return node


def _method_list(text: str) -> list[str]:
    """--methods: comma-separated method names, nll among them (argparse type)."""
    methods = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    repeated = sorted({name for name in methods if methods.count(name) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"{', '.join(repeated)} given more than once")
    if REFERENCE not in methods:
        raise argparse.ArgumentTypeError(
            f"{REFERENCE} (the reference every ratio is formed against) must be in the list, e.g. {REFERENCE},"
            + ",".join(methods or ["kd"])
        )
    return methods


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="megatron-let benchmark",
        description="Baseline vs LET step time, throughput and peak memory (the LET paper's Table 4 layout), "
        "each run a fresh torchrun process group. See megatron_let/apps/benchmark.py for how each "
        "figure is computed.",
    )
    parser.add_argument(
        "--config", required=True, help="the YAML config of the LET run (baseline: the same, alignment.enabled=false)"
    )
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override passed to every run (repeatable), e.g. --set teacher.load=null",
    )
    parser.add_argument("--nproc-per-node", type=int, default=1)
    parser.add_argument("--train-iters", type=int, default=40, help="iterations per run (default 40)")
    parser.add_argument(
        "--stop-step", type=int, default=20, help="S_stop of the LET run: iterations 1..S_stop align (default 20)"
    )
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant, order alternating")
    parser.add_argument("--warmup", type=int, default=3, help="first iterations excluded from every phase (default 3)")
    parser.add_argument(
        "--num-layers",
        type=int,
        nargs="+",
        default=None,
        metavar="L",
        help="override model.num_layers; two or more depths add a per-layer extrapolation to --extrapolate-to layers",
    )
    parser.add_argument(
        "--extrapolate-to",
        type=int,
        default=None,
        metavar="L",
        help="depth of the extrapolation (default: the config's model.num_layers)",
    )
    parser.add_argument("--mock-data", action="store_true", help="data.mock_data=true: no dataset needed")
    parser.add_argument(
        "--methods",
        type=_method_list,
        default=None,
        metavar="LIST",
        help="instead of baseline vs LET: every listed training objective (comma-separated, nll among them, "
        f"from {','.join(METHODS)}), each in its costly phase for the whole run, against nll, with each "
        "method's counted FLOPs per token; --stop-step is not used",
    )
    parser.add_argument(
        "--sync-debug",
        action="store_true",
        help="GPU: run the last warm-up iteration under CUDA's sync debug mode and report how many "
        "call sites synchronise the host with the device (listed in each run's output.log)",
    )
    parser.add_argument(
        "--project-train-iters",
        type=int,
        default=None,
        metavar="T",
        help="also print the run average projected to T iterations",
    )
    parser.add_argument(
        "--project-stop-step",
        type=int,
        default=None,
        metavar="S",
        help="S_stop of the projection (default: the config's alignment.stop_step)",
    )
    parser.add_argument(
        "--output-dir",
        default="runs/benchmark",
        help="each run's metrics.jsonl and output.log go to OUTPUT_DIR/<run>/ (default runs/benchmark)",
    )
    parser.add_argument("--json-out", default=None, metavar="FILE", help="write every figure as JSON")
    parser.add_argument(
        "--run-timeout",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop a run (and the benchmark) after this long",
    )
    args = parser.parse_args(argv)
    if args.methods is not None:
        if args.num_layers and len(set(args.num_layers)) > 1:
            parser.error("argument --methods: --num-layers takes one depth with --methods (no extrapolation)")
        if args.project_train_iters is not None or args.project_stop_step is not None:
            parser.error("argument --methods: no run average to project (each method runs one phase)")
    return args


def _check_args(args: argparse.Namespace) -> None:
    methods = getattr(args, "methods", None)
    reserved = {**_RESERVED, **_RESERVED_METHODS} if methods is not None else _RESERVED
    for assignment in args.set:
        key = assignment.partition("=")[0].strip()
        if "=" not in assignment:
            raise BenchmarkError(f"--set {assignment!r}: expected key=value")
        if key in reserved or (key == "model.num_layers" and args.num_layers):
            flag = reserved.get(key, "--num-layers")
            raise BenchmarkError(f"--set {key}: the benchmark sets this itself; use {flag}")
    if methods is not None:
        if args.train_iters < 1 or args.repeats < 1 or args.warmup < 0 or args.nproc_per_node < 1:
            raise BenchmarkError("--train-iters, --repeats and --nproc-per-node must be >= 1, --warmup >= 0")
        if args.warmup >= args.train_iters:
            raise BenchmarkError(f"--warmup {args.warmup} leaves no iteration of --train-iters {args.train_iters}")
        return
    if args.train_iters < 1 or args.stop_step < 1 or args.repeats < 1 or args.warmup < 0 or args.nproc_per_node < 1:
        raise BenchmarkError("--train-iters, --stop-step, --repeats and --nproc-per-node must be >= 1, --warmup >= 0")
    if args.warmup >= args.stop_step:
        raise BenchmarkError(
            f"--warmup {args.warmup} leaves no 'during alignment' iteration before --stop-step {args.stop_step}"
        )
    if args.stop_step + 1 + 1 > args.train_iters:
        progress(
            f"note: --train-iters {args.train_iters} leaves no iteration after S_stop + 1 = "
            f"{args.stop_step + 1}: 'after S_stop' will be n/a"
        )


def _run_entries(runs: Sequence[Run]) -> list[dict]:
    return [
        {
            "name": r.name,
            "variant": r.variant,
            "repeat": r.repeat,
            "num_layers": r.num_layers,
            "order": i,
            "directory": str(r.directory),
            "metrics": str(r.metrics_path),
            "log": str(r.log_path),
            "returncode": r.returncode,
            "wall_s": r.wall_s,
            "host_syncs": next((rec["host_syncs"] for rec in r.records if "host_syncs" in rec), None),
        }
        for i, r in enumerate(runs)
    ]


def benchmark_methods(args: argparse.Namespace) -> dict:
    """--methods: every listed objective against nll (see the module docstring)."""
    from megatron_let.config import ConfigError

    methods = list(args.methods)
    output = Path(args.output_dir)
    depth = args.num_layers[0] if args.num_layers else None
    runs = []
    for position, method in enumerate(method_order(methods, args.repeats)):
        run = Run(method, position // len(methods), depth, Path(), method=method)
        run.directory = output / run.name
        runs.append(run)
    flops = {}
    for method in methods:  # before any run: a method the config cannot train fails here
        first = next(r for r in runs if r.method == method)
        try:
            flops[method] = counted_flops(args.config, overrides(args, first))
        except (ConfigError, OSError, ValueError) as err:
            raise BenchmarkError(f"--methods {method}: {args.config} with the run's --set values: {err}") from None
    for index, run in enumerate(runs, 1):
        execute(args, run, index, len(runs))

    result = analyse_methods(
        {m: [r.records for r in runs if r.method == m] for m in methods}, args.warmup, args.train_iters
    )
    for method, entry in result["per_method"].items():
        entry["sets"] = _method_sets(method, args.train_iters)
        entry["flops_per_token"] = flops[method]
        entry["counted_flops_ratio"] = {
            convention: _ratio(flops[method][convention]["total"], flops[REFERENCE][convention]["total"])
            for convention in CONVENTION_TITLES
        }
    return {
        "setup": {
            "config": args.config,
            "set": args.set,
            "methods": methods,
            "nproc_per_node": args.nproc_per_node,
            "train_iters": args.train_iters,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "num_layers": depth,
            "mock_data": args.mock_data,
            "output_dir": str(output),
        },
        "runs": _run_entries(runs),
        "methods": result,
    }


def benchmark(args: argparse.Namespace) -> dict:
    _check_args(args)
    if getattr(args, "methods", None) is not None:
        return benchmark_methods(args)
    raw = _raw_config(args.config, args.set)
    projection = None
    if args.project_train_iters is not None or args.project_stop_step is not None:
        t = args.project_train_iters or _lookup(raw, "training.train_iters", 100)
        s = args.project_stop_step or _lookup(raw, "alignment.stop_step", 1500)
        projection = (int(t), int(s))
    output = Path(args.output_dir)
    depths = list(dict.fromkeys(args.num_layers)) if args.num_layers else [None]
    runs = []
    for depth in depths:
        for position, variant in enumerate(run_order(args.repeats)):
            run = Run(variant, position // 2, depth, Path())
            run.directory = output / run.name
            runs.append(run)
    for index, run in enumerate(runs, 1):
        execute(args, run, index, len(runs))

    results: list[dict] = []
    for depth in depths:
        mine = [r for r in runs if r.num_layers == depth]
        phases = analyse(
            [r.records for r in mine if r.variant == "let"],
            [r.records for r in mine if r.variant == "baseline"],
            args.warmup,
            projection,
        )
        results.append({"num_layers": depth, "phases": phases})
    report = {
        "setup": {
            "config": args.config,
            "set": args.set,
            "nproc_per_node": args.nproc_per_node,
            "train_iters": args.train_iters,
            "stop_step": args.stop_step,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "mock_data": args.mock_data,
            "projection": projection,
            "output_dir": str(output),
        },
        "runs": _run_entries(runs),
        "results": results,
        "extrapolation": None,
    }
    if len(depths) >= 2:
        target = args.extrapolate_to or _lookup(raw, "model.num_layers")
        if target is None:
            raise BenchmarkError("--extrapolate-to: the config has no model.num_layers to extrapolate to")
        report["extrapolation"] = extrapolate({r["num_layers"]: r["phases"] for r in results}, int(target), projection)
    return report


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = benchmark(args)
    except BenchmarkError as err:
        print(f"benchmark: error: {err}", file=sys.stderr, flush=True)
        return 1
    print(format_report(report), flush=True)
    if args.json_out:
        path = Path(args.json_out)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_json_safe(report), indent=2) + "\n")
        progress(f"figures written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
