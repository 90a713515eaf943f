"""``megatron-let study --config study.yaml``: a comparison of training methods, run and reported.

One YAML names the runs' shared config (a run config, or the quickstart's real corpus and
pretrained teacher), a budget, the methods, and a small hyperparameter grid shared by them (the
compute-matched paper's protocol: the same (η, τ, α) for every method, γ for HLDC, P1 for HLDF).
The runner trains every (method, grid point) through the normal trainer, skips runs already
complete, resumes interrupted ones (each run's checkpoint directory), evaluates each run on the
held-out splits (the trainer's own valid/test evaluation; optionally lm-eval's downstream tasks
on each method's best run) and writes ``<work_dir>/report/report.md`` with both papers' tables and
PNG plots. Interrupt it at any time and run the same command again.

The study file (paths relative to it)::

    name: hld_tiny                    # the report's title
    work_dir: study_hld_tiny          # runs, configs and the report (relative to the current directory)
    config: my_run.yaml               # the run config every run starts from, or instead:
    quickstart: {}                    #   the quickstart's corpus, tokenizer and NLL-pretrained teacher, built
                                      #   once (or reused) in work_dir (default <work_dir>/quickstart; a
                                      #   `megatron-let quickstart --work-dir` directory serves); keys:
                                      #   work_dir, smoke, max_docs
    overrides: {training: {...}}      # sections merged into that config for every run
    budget: {ot: 0.5}                 # or {flops: 2.0e+13}, or {steps: 300}: every run's size
    methods:                          # name: its sections (method: … and anything else), or a list of method names
      nll: {method: nll}
      hldf: {method: hldf}
    grid:                             # dotted key: values; a key applies to the methods that read it
      optimizer.lr: [1.0e-3, 3.0e-3]
      distillation.alpha: [0.5]       #   distillation.*: kd rkd salt hldc hldf; alignment.*: let
      hld.gamma: [0.05]               #   hld.gamma: hldc; hld.phase1_*: hldf
    baseline: nll                     # LET-paper tables: relative gains and speedups against it
    reference: kd                     # compute-matched tables: pointwise differences against it (optional)
    eval: {interval: 20, iters: 4}    # held-out loss every `interval` steps (the loss-vs-FLOPs curves)
    downstream: {tasks: "ARC-e,PIQA", limit: 200}   # optional: lm-eval on each method's best run (or those
                                      #   in `methods: [...]`), exported to Hugging Face format with
                                      #   `tokenizer_dir` (a quickstart study makes one from its tokenizer)
    nproc_per_node: 1                 # processes per run (torchrun); parallel: sections in overrides

``--emit-sbatch DIR`` writes a Slurm job array instead (one task per run, each calling
``megatron-let study --config … --only INDEX``) and a report job that depends on it.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, Optional

import yaml

from megatron_let.apps.quickstart import read_metrics
from megatron_let.config import DISTILLATION_METHODS, ConfigError
from megatron_let.platform.files import write_text_atomic

LOGIT_METHODS = tuple(DISTILLATION_METHODS) + ("hldc", "hldf")
# Which methods read a grid key: the most specific prefix wins; a key not listed applies to all.
KEY_METHODS: dict[str, tuple[str, ...]] = {
    "distillation.": LOGIT_METHODS,
    "alignment.": ("let",),
    "hld.": ("hldc", "hldf"),
    "hld.gamma": ("hldc",),
    "hld.phase1_": ("hldf",),
    "teacher.": ("let", *LOGIT_METHODS),
}
STUDY_KEYS = (
    "name",
    "work_dir",
    "config",
    "quickstart",
    "overrides",
    "budget",
    "methods",
    "grid",
    "baseline",
    "reference",
    "eval",
    "downstream",
    "nproc_per_node",
)


def progress(message: str) -> None:
    print(f"[study {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ------------------------------------------------------------------------------ the study file


@dataclass
class Study:
    path: Path
    name: str
    work_dir: Path
    base: dict  # the run config every run starts from (after overrides)
    budget: dict  # {"steps": n} | {"flops": x} | {"ot": k}
    methods: dict[str, dict]  # variant name → its sections (with "method")
    grid: dict[str, list]
    baseline: str
    reference: Optional[str]
    eval_interval: int
    eval_iters: int
    downstream: Optional[dict]
    nproc_per_node: int
    quickstart: Optional[dict] = None
    config_path: Optional[Path] = None
    tokenizer_dir: Optional[Path] = None  # the Hugging Face tokenizer for exports (downstream)


def _bad(path: Path, key: str, message: str) -> NoReturn:
    raise ConfigError(f"{path}: {key}: {message}")


def load_study(path: Path) -> Study:
    """Read and check a study file; errors name the file and key."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the study file: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    for key in raw:
        if key not in STUDY_KEYS:
            _bad(path, str(key), f"unknown key (expected one of {', '.join(STUDY_KEYS)})")
    if ("config" in raw) == ("quickstart" in raw):
        _bad(path, "config", "give the runs' config (config: a run YAML) or quickstart: {…}, one of the two")
    config_path = None
    base: dict = {}
    if "config" in raw:
        config_path = (path.parent / str(raw["config"])).resolve()
        try:
            base = yaml.safe_load(config_path.read_text()) or {}
        except OSError as err:
            _bad(path, "config", f"cannot read {config_path}: {err.strerror}")
    overrides = raw.get("overrides") or {}
    if not isinstance(overrides, dict):
        _bad(path, "overrides", "expected a mapping of config sections")
    base = merge(base, overrides)

    budget = raw.get("budget")
    if not (isinstance(budget, dict) and len(budget) == 1 and next(iter(budget)) in ("steps", "flops", "ot")):
        _bad(path, "budget", f"expected one of {{steps: N}}, {{flops: X}}, {{ot: k}}, got {budget!r}")
    ((kind, amount),) = budget.items()
    try:
        amount = float(amount)
    except (TypeError, ValueError):
        _bad(path, f"budget.{kind}", f"expected a number, got {amount!r}")
    if amount <= 0 or (kind == "steps" and amount != int(amount)):
        _bad(path, f"budget.{kind}", f"expected a positive {'integer' if kind == 'steps' else 'number'}, got {amount}")

    methods: Any = raw.get("methods")
    if isinstance(methods, list):
        methods = {str(name): {"method": str(name)} for name in methods}
    if not isinstance(methods, dict) or not methods:
        _bad(path, "methods", "expected a list of methods or a mapping name: {method: …, …}")
    for name, sections in methods.items():
        if not isinstance(sections, dict) or "method" not in sections:
            _bad(path, f"methods.{name}", "expected a mapping with method: (nll, let, kd, rkd, salt, hldc, hldf)")
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict):
        _bad(path, "grid", "expected a mapping of dotted config keys to lists of values")
    grid = {str(k): (v if isinstance(v, list) else [v]) for k, v in grid.items()}
    for key, values in grid.items():
        if not values:
            _bad(path, f"grid.{key}", "an empty list of values")
    baseline = str(raw.get("baseline", next(iter(methods))))
    reference = raw.get("reference")
    for key, value in (("baseline", baseline), ("reference", reference)):
        if value is not None and value not in methods:
            _bad(path, key, f"{value!r} is not one of the methods ({', '.join(methods)})")
    ev = raw.get("eval") or {}
    interval, iters = int(ev.get("interval", 20)), int(ev.get("iters", 4))
    if interval < 1 or iters < 1:
        _bad(path, "eval", f"interval and iters must be >= 1, got {ev}")
    nproc = int(raw.get("nproc_per_node", 1))
    if nproc < 1:
        _bad(path, "nproc_per_node", f"must be >= 1, got {nproc}")
    downstream = raw.get("downstream")
    if downstream is not None and not (isinstance(downstream, dict) and "tasks" in downstream):
        _bad(path, "downstream", "expected {tasks: …, limit: N, tokenizer_dir: …, methods: [...]}")
    for key in downstream or {}:
        if key not in ("tasks", "limit", "tokenizer_dir", "methods"):
            _bad(path, f"downstream.{key}", "unknown key (expected tasks, limit, tokenizer_dir or methods)")
    quickstart = raw.get("quickstart")
    if quickstart is not None and not isinstance(quickstart, dict):
        _bad(path, "quickstart", "expected a mapping (may be empty: {})")
    for key in quickstart or {}:
        if key not in ("work_dir", "smoke", "max_docs"):
            _bad(path, f"quickstart.{key}", "unknown key (expected work_dir, smoke or max_docs)")
    return Study(
        path=path,
        name=str(raw.get("name", path.stem)),
        work_dir=Path(str(raw.get("work_dir", path.stem))).resolve(),
        base=base,
        budget={kind: int(amount) if kind == "steps" else amount},
        methods=methods,
        grid=grid,
        baseline=baseline,
        reference=str(reference) if reference is not None else None,
        eval_interval=interval,
        eval_iters=iters,
        downstream=downstream,
        nproc_per_node=nproc,
        quickstart=quickstart,
        config_path=config_path,
    )


def merge(base: dict, extra: dict) -> dict:
    """``extra``'s sections merged into a copy of ``base`` (mappings key by key, the rest replaced)."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def dotted_to_nested(key: str, value: Any) -> dict:
    node: Any = value
    for part in reversed(key.split(".")):
        node = {part: node}
    return node


def applies(key: str, method: str) -> bool:
    """Whether a run of ``method`` reads grid key ``key``."""
    matches = [prefix for prefix in KEY_METHODS if key.startswith(prefix)]
    if not matches:
        return True
    return method in KEY_METHODS[max(matches, key=len)]


# ------------------------------------------------------------------------------ the runs


@dataclass
class Run:
    index: int
    name: str
    variant: str
    method: str
    point: dict[str, Any]  # the grid values this run reads
    config: dict = field(repr=False, default_factory=dict)


def _short(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def expand_runs(study: Study, base: dict) -> list[Run]:
    """Every variant at every combination of the grid keys it reads (others dropped, so a method
    runs once per distinct setting), with its full config."""
    runs: list[Run] = []
    for variant, sections in study.methods.items():
        method = sections["method"]
        keys = [k for k in study.grid if applies(k, method)]
        for values in itertools.product(*(study.grid[k] for k in keys)):
            point = dict(zip(keys, values))
            name = variant + "".join(f"__{k.rsplit('.', 1)[-1]}_{_short(v)}" for k, v in point.items())
            cfg = merge(base, sections)
            for key, value in point.items():
                cfg = merge(cfg, dotted_to_nested(key, value))
            runs.append(Run(len(runs), name.replace("/", "_"), variant, method, point, cfg))
    names = [run.name for run in runs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigError(f"{study.path}: grid: values that read the same give runs one name: {', '.join(twice)}")
    return runs


def trainer_config(study: Study, run: Run) -> dict:
    """The run's config as the trainer reads it: the budget, its own checkpoint directory (save
    and load: a rerun resumes), held-out evaluation."""
    cfg = copy.deepcopy(run.config)
    training = cfg.setdefault("training", {})
    ((kind, amount),) = study.budget.items()
    if kind == "steps":
        training["train_iters"] = amount
        training.pop("flops_budget", None)
    else:
        training.pop("train_iters", None)
        training["flops_budget"] = amount if kind == "flops" else f"OT_{amount:g}"
    save = str(study.work_dir / "runs" / run.name)
    cfg["checkpoint"] = {**(cfg.get("checkpoint") or {}), "save": save, "load": save}
    cfg["eval"] = {**(cfg.get("eval") or {}), "eval_interval": study.eval_interval}
    cfg["eval"].update(eval_iters=study.eval_iters, test_at_end=True)
    return cfg


def prepare_base(study: Study) -> dict:
    """The runs' shared config: the study's, or the quickstart's data and teacher (built once)."""
    if study.quickstart is None:
        return study.base
    from megatron_let.apps import quickstart

    options = study.quickstart
    plan = quickstart.Plan.smoke() if options.get("smoke") else quickstart.Plan()
    work = Path(str(options.get("work_dir") or study.work_dir / "quickstart")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    _, prefixes = quickstart.prepare_data(work, plan, options.get("max_docs"))
    teacher_model = quickstart.model_section(plan.teacher, plan.vocab_size, plan.seq_length)
    target_model = quickstart.model_section(plan.target, plan.vocab_size, plan.seq_length)
    teacher_dir = work / "runs" / "teacher"
    teacher_cfg = quickstart.training_config(plan, prefixes, teacher_model, plan.teacher_iters, teacher_dir)
    quickstart.train("teacher", teacher_cfg, work)
    # Its SentencePiece model as a Hugging Face Llama tokenizer, for exported checkpoints (downstream).
    study.tokenizer_dir = work / "hf_tokenizer"
    if not (study.tokenizer_dir / "tokenizer_config.json").exists():
        study.tokenizer_dir.mkdir(exist_ok=True)
        shutil.copyfile(work / "tokenizer" / "spm.model", study.tokenizer_dir / "tokenizer.model")
        write_text_atomic(study.tokenizer_dir / "tokenizer_config.json", '{"tokenizer_class": "LlamaTokenizer"}\n')
    base = quickstart.training_config(plan, prefixes, target_model, plan.target_iters, teacher_dir)
    base["teacher"] = {"model": teacher_model, "load": str(teacher_dir)}
    base.pop("alignment", None)
    return merge(base, study.base)


def config_digest(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_run_config(study: Study, run: Run, cfg: dict) -> Path:
    """configs/<run>.yaml; a run already set up there with another config than the study now
    gives it is refused (not trained further, nor reported as the study's)."""
    path = study.work_dir / "configs" / f"{run.name}.yaml"
    if path.exists() and config_digest(yaml.safe_load(path.read_text())) != config_digest(cfg):
        raise ConfigError(
            f"{path}: run {run.name} was set up with another config than {study.path} now gives it: remove "
            f"{path} and {study.work_dir / 'runs' / run.name}, or use another work_dir"
        )
    return path


def write_run_config(study: Study, run: Run, cfg: dict) -> Path:
    """configs/<run>.yaml (:func:`check_run_config`), checked by the trainer's own loader (errors
    name the run's key)."""
    from megatron_let.run_config import load_run_config

    path = check_run_config(study, run, cfg)
    written = not path.exists()
    if written:
        write_text_atomic(path, yaml.safe_dump(cfg, sort_keys=False))
    try:
        load_run_config(path)
    except ConfigError as err:
        if written:
            path.unlink()
        raise ConfigError(f"{study.path}: run {run.name}: {err}") from None
    return path


def launch(study: Study, run: Run, cfg: dict, position: str) -> dict:
    """Train one run (skipped when complete, resumed when interrupted); returns its DONE record."""
    save = Path(cfg["checkpoint"]["save"])
    config_path = study.work_dir / "configs" / f"{run.name}.yaml"
    done = save / "DONE.json"
    if done.exists():
        progress(f"{position} {run.name}: complete, skipped")
        return json.loads(done.read_text())
    resuming = (save / "latest_checkpointed_iteration.txt").exists()
    progress(f"{position} {run.name}: training" + (" (resuming from its checkpoint)" if resuming else ""))
    command = [sys.executable, "-m", "megatron_let.train", "--config", str(config_path)]
    if study.nproc_per_node > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={study.nproc_per_node}"]
        command = [sys.executable, *launcher, *command[1:]]
    save.mkdir(parents=True, exist_ok=True)
    start = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    with open(save / "train.log", "a") as log:
        result = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    if result.returncode != 0:
        tail = (save / "train.log").read_text().splitlines()[-15:]
        raise SystemExit(
            f"study: run {run.name} failed (exit {result.returncode}); its log: {save / 'train.log'}\n"
            + "\n".join(tail)
            + "\nrun the same command again to resume it"
        )
    train, valid, test = read_metrics(save)
    record = {"wall_s": round(time.time() - start, 1), "iterations": train[-1]["iteration"] if train else 0}
    write_text_atomic(done, json.dumps(record))
    progress(
        f"{position} {run.name}: done in {record['wall_s']:.0f} s, {record['iterations']} steps"
        + (f", test loss {test[-1]['lm_loss']:.4f}" if test else "")
    )
    return record


def _run_step(command: list[str], what: str) -> None:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-15:])
        raise SystemExit(f"study: {what} failed (exit {result.returncode}):\n{tail}\n{' '.join(command)}")


def evaluate_downstream(study: Study, run: Run) -> Optional[dict]:
    """lm-eval's tasks on the run's final checkpoint, exported to Hugging Face format (cached)."""
    options = study.downstream or {}
    save = study.work_dir / "runs" / run.name
    output = save / "downstream.json"
    if not output.exists():
        hf = study.work_dir / "hf" / run.name  # outside the checkpoint it is exported from
        if not (hf / "config.json").exists():
            export = [sys.executable, "-m", "megatron_let.convert", "export", "--load", str(save)]
            export += ["--output", str(hf), "--overwrite"]
            if options.get("tokenizer_dir"):
                export += ["--tokenizer-dir", str((study.path.parent / str(options["tokenizer_dir"])).resolve())]
            elif study.tokenizer_dir is not None:
                export += ["--tokenizer-dir", str(study.tokenizer_dir)]
            _run_step(export, f"exporting run {run.name} to Hugging Face format")
        progress(f"{run.name}: downstream tasks {options['tasks']}")
        command = [sys.executable, "-m", "megatron_let.evaluation.downstream", "--model-dir", str(hf)]
        command += ["--tasks", str(options["tasks"]), "--output", str(output)]
        if run.config.get("device") == "cpu":
            command += ["--device", "cpu"]
        if options.get("limit"):
            command += ["--limit", str(options["limit"])]
        _run_step(command, f"the downstream evaluation of run {run.name}")
    return json.loads(output.read_text())["table"]


# ------------------------------------------------------------------------------ the report


@dataclass
class Result:
    run: Run
    train: list
    valid: list
    test: list
    wall_s: float
    downstream: Optional[dict] = None

    @property
    def test_loss(self) -> float:
        return self.test[-1]["lm_loss"] if self.test else float("nan")

    @property
    def valid_loss(self) -> float:
        return self.valid[-1]["lm_loss"] if self.valid else float("nan")

    def flops_at(self, iteration: int) -> float:
        return next(r["flops_total"] for r in self.train if r["iteration"] == iteration)


def best_runs(results: list[Result]) -> dict[str, Result]:
    """Each variant's run with the lowest final validation loss (the test split stays for the report)."""
    best: dict[str, Result] = {}
    for result in results:
        current = best.get(result.run.variant)
        if current is None or result.valid_loss < current.valid_loss:
            best[result.run.variant] = result
    return best


def to_reach(result: Result, target: float) -> Optional[tuple[int, float]]:
    """(steps, FLOPs) at the first held-out evaluation with loss ≤ ``target``."""
    for record in result.valid:
        if record["lm_loss"] <= target:
            return record["iteration"], result.flops_at(record["iteration"])
    return None


def pointwise(results: list[Result], reference: str) -> list[dict]:
    """Each run against the reference variant's runs at identical shared hyperparameters."""
    pairs = []
    references = [r for r in results if r.run.variant == reference]
    for result in results:
        if result.run.variant == reference:
            continue
        for ref in references:
            shared = set(result.run.point) & set(ref.run.point)
            if all(result.run.point[k] == ref.run.point[k] for k in shared):
                pairs.append(
                    {
                        "variant": result.run.variant,
                        "run": result.run.name,
                        "reference_run": ref.run.name,
                        "point": {k: ref.run.point[k] for k in sorted(shared)},
                        "reference_loss": ref.test_loss,
                        "loss": result.test_loss,
                        "difference": result.test_loss - ref.test_loss,
                    }
                )
    return pairs


def _hp(point: dict) -> str:
    return ", ".join(f"{k.rsplit('.', 1)[-1]} {_short(v)}" for k, v in point.items()) or "—"


def write_report(study: Study, results: list[Result]) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = study.work_dir / "report"
    report.mkdir(parents=True, exist_ok=True)
    best = best_runs(results)
    base = best.get(study.baseline)
    ((kind, amount),) = study.budget.items()
    budget_text = {"steps": f"{amount} steps", "flops": f"{amount:.3g} FLOPs", "ot": f"OT_{amount:g}"}[kind]
    lines = [
        f"# {study.name}",
        "",
        f"{len(results)} runs: {len(study.methods)} methods × the grid "
        f"({'; '.join(f'{k}: {v}' for k, v in study.grid.items()) or 'no grid'}), each sized by {budget_text} "
        "(FLOPs counted per method and phase: megatron_let.flops). Held-out loss = log-perplexity (nats per "
        "token) on the test split, each method's best run chosen on the validation split.",
        "",
        "## All runs",
        "",
        "| run | method | hyperparameters | steps | tokens | FLOPs | valid loss | test loss | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        last = r.train[-1] if r.train else {}
        tokens = last.get("consumed_samples", 0) * (r.run.config.get("training", {}).get("seq_length") or 0)
        lines.append(
            f"| {r.run.name} | {r.run.method} | {_hp(r.run.point)} | {last.get('iteration', 0)} | {tokens:.3g} | "
            f"{last.get('flops_total', 0):.3g} | {r.valid_loss:.4f} | {r.test_loss:.4f} | {r.wall_s:.0f} |"
        )

    # LET paper, Tables 1/5: each method's best run, its scores and the relative gain over the baseline.
    tasks = sorted({t for r in best.values() if r.downstream for t in r.downstream if t != "Avg."})
    lines += ["", f"## Against the baseline ({study.baseline}) — the LET paper's Tables 1/5 layout", ""]
    header = ["method", "test loss", "Δ vs baseline", *tasks] + (["Avg.", "relative gain"] if tasks else [])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for variant, r in best.items():
        row = [variant, f"{r.test_loss:.4f}", f"{r.test_loss - base.test_loss:+.4f}" if base else "—"]
        if tasks:
            scores = r.downstream or {}
            row += [f"{scores[t]:.1f}" if t in scores else "—" for t in tasks]
            average = scores.get("Avg.")
            base_avg = (base.downstream or {}).get("Avg.") if base else None
            gain = f"{100 * (average - base_avg) / base_avg:+.1f}%" if average and base_avg else "—"
            row += [f"{average:.1f}" if average is not None else "—", gain]
        lines.append("| " + " | ".join(row) + " |")

    # The speedup: steps and FLOPs to reach the baseline's final validation loss.
    speedups = {}
    if base is not None and base.valid:
        target = base.valid_loss
        base_steps, base_flops = base.valid[-1]["iteration"], base.flops_at(base.valid[-1]["iteration"])
        lines += [
            "",
            f"## Speedup — steps and FLOPs to the baseline's final validation loss ({target:.4f})",
            "",
            "| method | steps | FLOPs | speedup (steps) | speedup (FLOPs) |",
            "|---|---|---|---|---|",
        ]
        for variant, r in best.items():
            reached = to_reach(r, target)
            if reached is None:
                lines.append(f"| {variant} | not reached | — | — | — |")
                continue
            steps, flops = reached
            speedups[variant] = {"steps": steps, "flops": flops}
            lines.append(
                f"| {variant} | {steps} | {flops:.3g} | {base_steps / steps:.2f}× | {base_flops / flops:.2f}× |"
            )

    # Compute-matched paper, Table 1 (best vs best) and its pointwise comparisons.
    lowest = min(r.test_loss for r in best.values())
    lines += [
        "",
        "## Best vs best — the compute-matched paper's Table 1 layout (↓ better)",
        "",
        "| " + " | ".join(["method", "hyperparameters", "test log-perplexity", *(f"{t} error" for t in tasks)]) + " |",
        "|---|---|---|" + "---|" * len(tasks),
    ]
    for variant, r in best.items():
        loss = f"**{r.test_loss:.4f}**" if r.test_loss == lowest else f"{r.test_loss:.4f}"
        errors = [f"{100 - r.downstream[t]:.1f}" if r.downstream and t in r.downstream else "—" for t in tasks]
        lines.append("| " + " | ".join([variant, _hp(r.run.point), loss, *errors]) + " |")
    pairs = pointwise(results, study.reference) if study.reference else []
    if pairs:
        lines += [
            "",
            f"## Pointwise against {study.reference} at identical hyperparameters (test loss; < 0: beats it)",
            "",
            f"| method | shared hyperparameters | {study.reference} | method | difference |",
            "|---|---|---|---|---|",
        ]
        for p in pairs:
            lines.append(
                f"| {p['variant']} | {_hp(p['point'])} | {p['reference_loss']:.4f} | {p['loss']:.4f} | "
                f"{p['difference']:+.4f} |"
            )
        for variant in dict.fromkeys(p["variant"] for p in pairs):
            mine = [p for p in pairs if p["variant"] == variant]
            wins = sum(p["difference"] < 0 for p in mine)
            lines.append(f"\n{variant} beats {study.reference} at {wins} of {len(mine)} shared settings.")
    lines += ["", "![held-out loss against FLOPs](loss_vs_flops.png)", ""]
    if pairs:
        lines += ["![pointwise](pointwise.png)", ""]
    text = "\n".join(lines)

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for variant, r in best.items():
        if r.valid:
            xs = [r.flops_at(v["iteration"]) for v in r.valid]
            ax.plot(xs, [v["lm_loss"] for v in r.valid], marker="o", ms=3, label=f"{variant} ({_hp(r.run.point)})")
    ax.set_xlabel("training FLOPs (counted per method)")
    ax.set_ylabel("validation loss")
    ax.set_title("held-out loss at equal compute (best run of each method)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(report / "loss_vs_flops.png", dpi=120)
    plt.close(fig)
    if pairs:
        fig, ax = plt.subplots(figsize=(4.6, 4.6))
        for variant in dict.fromkeys(p["variant"] for p in pairs):
            mine = [p for p in pairs if p["variant"] == variant]
            ax.scatter([p["reference_loss"] for p in mine], [p["loss"] for p in mine], label=variant, s=18)
        values = [p[k] for p in pairs for k in ("reference_loss", "loss")]
        low, high = min(values), max(values)
        ax.plot([low, high], [low, high], color="gray", lw=0.8, ls="--")
        ax.set_xlabel(f"{study.reference} test loss")
        ax.set_ylabel("method's test loss (same hyperparameters)")
        ax.set_title(f"below the diagonal: beats {study.reference}")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(report / "pointwise.png", dpi=120)
        plt.close(fig)

    summary = {
        "best": {v: {"run": r.run.name, "test_loss": r.test_loss, "valid_loss": r.valid_loss} for v, r in best.items()},
        "speedup": speedups,
        "pointwise": pairs,
        "runs": {r.run.name: {"test_loss": r.test_loss, "valid_loss": r.valid_loss} for r in results},
    }
    write_text_atomic(report / "summary.json", json.dumps(summary, indent=2))
    write_text_atomic(report / "report.md", text + "\n")
    return text


# ------------------------------------------------------------------------------ sbatch


def emit_sbatch(study: Study, runs: list[Run], directory: Path) -> list[Path]:
    """A job array (one task per run: this Python, ``study --only INDEX``) and a report job to
    run after it (``--dependency=afterok``); logs in <work_dir>/slurm (made now: Slurm opens them
    before the script runs). Resources (GPUs, time, partition) come from sbatch's own options."""
    directory.mkdir(parents=True, exist_ok=True)
    logs = study.work_dir / "slurm"
    logs.mkdir(parents=True, exist_ok=True)
    me = f"{sys.executable} -m megatron_let.cli study --config {study.path.resolve()}"
    scripts = {
        "study_runs.sbatch": [
            f"#SBATCH --job-name={study.work_dir.name}",
            f"#SBATCH --array=0-{len(runs) - 1}",
            "#SBATCH --nodes=1",
            f"#SBATCH --output={logs}/%x-%A_%a.out",
            "#SBATCH --requeue",
            f'exec {me} --only "$SLURM_ARRAY_TASK_ID"',
        ],
        "study_report.sbatch": [
            f"#SBATCH --job-name={study.work_dir.name}-report",
            "#SBATCH --nodes=1",
            f"#SBATCH --output={logs}/%x-%j.out",
            f"exec {me} --report-only",
        ],
    }
    paths = []
    for name, lines in scripts.items():
        header, command = [line for line in lines if line.startswith("#SBATCH")], lines[-1]
        text = "\n".join(["#!/bin/bash", *header, "set -euo pipefail", f"cd {Path.cwd()}", command, ""])
        write_text_atomic(directory / name, text)
        paths.append(directory / name)
    return paths


# ------------------------------------------------------------------------------ CLI


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-let study", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path, help="the study file (YAML)")
    parser.add_argument("--only", type=int, default=None, help="train only the run with this index (a job-array task)")
    parser.add_argument("--report-only", action="store_true", help="write the report from the runs already complete")
    parser.add_argument("--list", action="store_true", help="list the runs and exit")
    parser.add_argument(
        "--emit-sbatch", type=Path, default=None, metavar="DIR", help="write a Slurm job array for the runs"
    )
    args = parser.parse_args(argv)
    try:
        study = load_study(args.config)
    except ConfigError as err:
        print(f"megatron-let study: {err}", file=sys.stderr)
        return 2
    if not args.list:
        study.work_dir.mkdir(parents=True, exist_ok=True)
    base = prepare_base(study) if not args.list else study.base
    try:
        runs = expand_runs(study, base)
    except ConfigError as err:
        print(f"megatron-let study: {err}", file=sys.stderr)
        return 2
    if args.only is not None and not 0 <= args.only < len(runs):
        print(f"megatron-let study: --only: {args.only} is not a run index (0..{len(runs) - 1})", file=sys.stderr)
        return 2
    if args.list:
        for run in runs:
            print(f"{run.index:>3}  {run.name}")
        return 0
    if args.emit_sbatch is not None:
        for path in emit_sbatch(study, runs, args.emit_sbatch):
            print(path)
        print(
            f"submit: jid=$(sbatch --parsable {args.emit_sbatch / 'study_runs.sbatch'}) && "
            f"sbatch --dependency=afterok:$jid {args.emit_sbatch / 'study_report.sbatch'}"
        )
        return 0
    progress(f"{study.name}: {len(runs)} runs in {study.work_dir}")
    chosen = [run for run in runs if args.only is None or run.index == args.only]
    try:
        configs = {run.name: trainer_config(study, run) for run in chosen}
        for run in chosen:
            if args.report_only:
                check_run_config(study, run, configs[run.name])
            else:
                write_run_config(study, run, configs[run.name])
    except ConfigError as err:
        print(f"megatron-let study: {err}", file=sys.stderr)
        return 2
    records = {}
    for run in chosen:
        save = study.work_dir / "runs" / run.name
        if args.report_only:
            if (save / "DONE.json").exists():
                records[run.name] = json.loads((save / "DONE.json").read_text())
            continue
        records[run.name] = launch(study, run, configs[run.name], f"[{run.index + 1}/{len(runs)}]")
    if args.only is not None:
        return 0
    results = []
    for run in runs:
        if run.name not in records:
            continue
        train, valid, test = read_metrics(study.work_dir / "runs" / run.name)
        results.append(Result(run, train, valid, test, records[run.name]["wall_s"]))
    if not results:
        print("megatron-let study: no complete run to report", file=sys.stderr)
        return 1
    if study.downstream:
        chosen_methods = study.downstream.get("methods") or list(study.methods)
        for variant, result in best_runs(results).items():
            if variant in chosen_methods:
                result.downstream = evaluate_downstream(study, result.run)
    text = write_report(study, results)
    print("\n" + text)
    progress(f"report: {study.work_dir / 'report' / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
