"""``megatron-let train --config FILE.yaml [--set key=value ...]`` (= ``python -m megatron_let.train``),
under torchrun or srun: load the run's config, build the :class:`~megatron_let.training.trainer.Trainer`,
train. Errors in what the user gave (config, data, checkpoints) are one line, without a traceback."""

from __future__ import annotations

from megatron_let.platform import signals

if __name__ == "__main__":
    signals.listen_early()  # before the slow imports below: a preemption may arrive during them

import argparse
import logging
import os
import sys

from megatron_let.config import ConfigError, InputError
from megatron_let.run_config import load_run_config
from megatron_let.training.trainer import Trainer, run

__all__ = ["Trainer", "main", "run"]


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="megatron-let train", description="pretrain a GPT with LET (under torchrun or srun)"
    )
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set training.train_iters=100 (repeatable)",
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_run_config(args.config, args.set)
        return run(cfg)
    except InputError as err:  # a config key, data file, checkpoint... named in the message
        # A config error is every rank's: said once. Others (a data file one rank read) by that rank.
        if not isinstance(err, ConfigError) or os.environ.get("RANK", "0") == "0":
            print(f"megatron-let: {err}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
