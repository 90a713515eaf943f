"""``megatron-let submit``: check a run before it waits in a Slurm queue, then sbatch it.

Everything that would otherwise fail after the allocation — the config, the data files, the
teacher, the layout against the number of tasks, a checkpoint directory another job is writing —
is checked here on the login node. It creates the log directory (Slurm opens ``--output`` before
the batch script runs), prints the exact sbatch command, and runs it unless ``--dry-run``.

    megatron-let submit --config examples/let_1.4b_smollm2.yaml --nodes 4 [--set key=value ...]
        [--time 24:00:00] [--partition P] [--account A] [--dry-run] [-- extra sbatch options]
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

from megatron_let.config import ConfigError, LETConfig
from megatron_let.platform.cluster import LOCK_NAME, RunLock, slurm_job_alive
from megatron_let.run_config import load_run_config

SCRIPT = Path(__file__).resolve().parents[2] / "slurm" / "pretrain_let.sbatch"


class SubmitError(RuntimeError):
    pass


def _data_prefixes(cfg: LETConfig) -> list[tuple[str, str]]:
    """(config key, prefix) for every indexed dataset the run reads (blends: weight prefix ...)."""
    found = []
    for key in ("data_path", "train_data_path", "valid_data_path", "test_data_path"):
        for item in getattr(cfg.data, key):
            try:
                float(item)
            except (TypeError, ValueError):
                found.append((f"data.{key}", str(item)))
    return found


def check_data(cfg: LETConfig) -> list[str]:
    """Each prefix has a readable .idx/.bin pair whose token type can hold the vocabulary."""
    if cfg.data.mock_data:
        return ["data: megatron's mock data"]
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from megatron_let.data.datasets import DataError, check_indexed_dataset

    notes = []
    for key, prefix in _data_prefixes(cfg):
        try:
            check_indexed_dataset(prefix, key, cfg.model.vocab_size)
        except DataError as err:
            raise SubmitError(str(err)) from None
        try:
            dataset = IndexedDataset(prefix)
        except Exception as err:  # megatron raises AssertionError / struct.error on a bad header
            raise SubmitError(f"{key}: {prefix}.idx is not a megatron indexed dataset: {err}") from None
        dtype = dataset.index.dtype
        if cfg.model.vocab_size > _max_token_count(dtype):
            raise SubmitError(
                f"{key}: {prefix} stores tokens as {dtype.__name__}, which cannot hold "
                f"model.vocab_size={cfg.model.vocab_size} ids: was it tokenized with another tokenizer?"
            )
        notes.append(f"{key}: {prefix} ({len(dataset)} documents, {dtype.__name__} tokens)")
    return notes


def _max_token_count(dtype) -> int:
    import numpy as np

    return int(np.iinfo(dtype).max) + 1


def check_checkpoint_directory(cfg: LETConfig) -> list[str]:
    ck = cfg.checkpoint
    notes = []
    if not ck.save:
        notes.append("checkpoint.save is not set: nothing will be saved, a requeued job starts over")
        return notes
    if ck.load is None or Path(ck.load).resolve() != Path(ck.save).resolve():
        notes.append("checkpoint.load differs from checkpoint.save: a requeued job will not resume its own saves")
    lock = RunLock(ck.save)
    holder = lock.holder()
    if holder and holder.get("job_id") and slurm_job_alive(holder["job_id"]):
        raise SubmitError(
            f"checkpoint.save: {ck.save} is being written by Slurm job {holder['job_id']} "
            f"({Path(ck.save) / LOCK_NAME}); two runs must not share a checkpoint directory"
        )
    return notes


def check_layout(cfg: LETConfig, tasks: int) -> None:
    model_parallel = cfg.parallel.tensor_model_parallel_size * cfg.parallel.pipeline_model_parallel_size
    if tasks % model_parallel:
        raise SubmitError(
            f"{tasks} tasks cannot hold tensor_model_parallel_size × pipeline_model_parallel_size "
            f"= {model_parallel}: choose --nodes/--ntasks-per-node so that it divides"
        )
    dp = tasks // model_parallel
    unit = cfg.training.micro_batch_size * dp
    if cfg.training.global_batch_size % unit:
        raise SubmitError(
            f"training.global_batch_size={cfg.training.global_batch_size} is not divisible by "
            f"micro_batch_size × data-parallel size = {cfg.training.micro_batch_size} × {dp}"
        )


def sbatch_command(args: argparse.Namespace, config: Path) -> list[str]:
    command = [
        "sbatch",
        f"--nodes={args.nodes}",
        f"--output={args.log_dir}/%x-%j.out",
        f"--export=ALL,MEGATRON_LET_LOG_DIR={args.log_dir}",
    ]
    if args.ntasks_per_node is not None:
        command.append(f"--ntasks-per-node={args.ntasks_per_node}")
    if args.gpus_per_node is not None:
        command.append(f"--gpus-per-node={args.gpus_per_node}")
    for flag in ("time", "partition", "account", "job_name"):
        value = getattr(args, flag)
        if value is not None:
            command.append(f"--{flag.replace('_', '-')}={value}")
    command += args.sbatch_args
    command += [str(args.script), str(config)]
    for assignment in args.set:
        command += ["--set", assignment]
    return command


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="megatron-let submit", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the training YAML")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument(
        "--ntasks-per-node", type=int, default=None, help="tasks (GPUs) per node; default: the script's (8)"
    )
    parser.add_argument("--gpus-per-node", type=int, default=None)
    parser.add_argument("--time", default=None, help="time limit, e.g. 24:00:00")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--job-name", default=None)
    parser.add_argument("--log-dir", default="logs", help="where Slurm writes the job log (created)")
    parser.add_argument("--script", type=Path, default=SCRIPT, help="the sbatch script")
    parser.add_argument("--dry-run", action="store_true", help="check and print the sbatch command, submit nothing")
    parser.add_argument("sbatch_args", nargs="*", help="after --: more sbatch options, passed as given")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_run_config(args.config, args.set)
    except ConfigError as err:
        print(f"megatron-let submit: {err}", file=sys.stderr)
        return 2
    tasks = args.nodes * (args.ntasks_per_node if args.ntasks_per_node is not None else 8)
    try:
        if not args.script.is_file():
            raise SubmitError(f"--script: {args.script} does not exist")
        check_layout(cfg, tasks)
        notes = check_data(cfg) + check_checkpoint_directory(cfg)
    except SubmitError as err:
        print(f"megatron-let submit: {args.config}: {err}", file=sys.stderr)
        return 2
    for note in notes:
        print(f"  {note}")
    Path(args.log_dir).mkdir(parents=True, exist_ok=True)
    command = sbatch_command(args, Path(args.config).resolve())
    print(("would run: " if args.dry_run else "running: ") + shlex.join(command), flush=True)
    if args.dry_run:
        return 0
    result = subprocess.run(command, text=True, capture_output=True)
    sys.stdout.write(result.stdout)
    sys.stderr.write(result.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
