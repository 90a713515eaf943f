"""``megatron-let convert import|export``: Hugging Face ↔ megatron-let checkpoints."""

from __future__ import annotations

import argparse
import logging
import sys

from megatron_let.convert.common import ConversionError


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="megatron-let convert",
                                description="Convert between Hugging Face models and megatron-let checkpoints.")
    sub = p.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="Hugging Face model directory (or GGUF) → megatron-let checkpoint")
    imp.add_argument("--hf-path", required=True, help="Hugging Face model directory")
    imp.add_argument("--gguf-file", help="a GGUF file name inside --hf-path (read through transformers)")
    imp.add_argument("--output", required=True, help="checkpoint root to write (iter_0000000/ goes inside)")
    imp.add_argument("--tensor-model-parallel-size", type=int, default=1,
                     help="TP the checkpoint will be loaded at (sets the vocab padding; any TP whose "
                          "padding is the same also works)")
    exp = sub.add_parser("export", help="megatron-let checkpoint (Llama-style) → Hugging Face Llama directory")
    exp.add_argument("--load", required=True, help="checkpoint root or iter_* directory, saved at any TP/PP")
    exp.add_argument("--output", required=True, help="Hugging Face directory to write")
    exp.add_argument("--tokenizer-dir", help="copy the tokenizer files from here")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "import":
            from megatron_let.convert.megatron_io import import_checkpoint

            directory = import_checkpoint(args.hf_path, args.output, tp=args.tensor_model_parallel_size,
                                          gguf_file=args.gguf_file)
        else:
            from megatron_let.convert.hf_export import export_checkpoint

            directory = export_checkpoint(args.load, args.output, tokenizer_dir=args.tokenizer_dir)
    except ConversionError as err:
        print(f"megatron-let convert {args.command}: error: {err}", file=sys.stderr)
        return 1
    print(directory)
    return 0
