"""Train a small SentencePiece tokenizer on a JSONL corpus (the train split of ``fetch_corpus``).

Small models trained on a CPU want a small vocabulary, and no hub is reachable to download one,
so megatron-let trains its own. The model keeps text exactly as written (``identity``
normalization, whitespace kept, ``\\n`` a piece of its own, byte fallback for unseen characters),
so ``decode(encode(text)) == text``.

Special ids: ``<unk>`` = 0, ``<s>`` = 1 and **``</s>`` = vocab_size - 1, the end-of-document
(EOD) token** that ``preprocess --append-eod`` appends (``SentencePieceTokenizer``'s EOD is the
model's EOS). Putting it last matches megatron-let's default ``data.eod_token_id`` (None →
``model.vocab_size - 1``) and GPT-2's ``<|endoftext|>`` = 50256 = vocab_size - 1.

Training is deterministic: the same input and flags give a byte-identical ``.model`` (sentences
are read in file order, all of them, unshuffled; the trainer's thread count is part of the model
file, hence a fixed default of 1; BPE gains nothing from more).

Bad input stops with one line naming the file and line (invalid JSON or UTF-8, a missing
``--json-key``), the input (no text to train on) or the flag and value (a ``--vocab-size`` larger
than the text allows, with the largest it allows); the command line does not replace an existing
``.model``/``.vocab`` unless ``--overwrite`` is given; the files appear only when complete.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import sys
import time
from typing import Iterator, Optional, Sequence

from megatron_let.data.preprocess import (
    PreprocessError,
    expand_inputs,
    make_output_dir,
    name_files,
    parse_record,
    refuse_existing,
    remove_stale_temps,
    temp_path,
)

MODEL_TYPES = ("bpe", "unigram")
UNK_ID, BOS_ID = 0, 1
MAX_SENTENCE_BYTES = 1 << 16
MIN_VOCAB_SIZE = 300  # 256 byte-fallback pieces, the special tokens and the characters


class TokenizerTrainingError(ValueError):
    """Bad input or flags; the message names the file:line or the flag."""


def _paragraphs(files: Sequence[str], json_key: str, stats: dict) -> Iterator[str]:
    """Training sentences: the paragraphs (blocks between blank lines) of every document, so the
    ``\\n`` inside verse and speeches is learnt as it will be seen."""
    for path in files:
        try:
            handle = open(path, "rb")
        except OSError as err:
            stats["error"] = TokenizerTrainingError(f"--input {path}: {err.strerror}")
            raise stats["error"] from None
        with handle:
            for line_no, raw in enumerate(handle, 1):
                stats["lines"] += 1
                record = parse_record(raw, [json_key], "--json-key")
                if record is None:
                    continue
                if isinstance(record, str):
                    # SentencePiece wraps what its sentence iterator raises into its own RuntimeError
                    stats["error"] = TokenizerTrainingError(f"{path}:{line_no}: {record}")
                    raise stats["error"]
                text = record[json_key]
                stats["documents"] += 1
                stats["bytes"] += len(text.encode("utf-8"))
                for paragraph in text.split("\n\n"):
                    if paragraph.strip():
                        stats["paragraphs"] += 1
                        yield paragraph


def _train(files: Sequence[str], json_key: str, stats: dict, **options) -> bytes:
    import sentencepiece

    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=_paragraphs(files, json_key, stats),
        model_writer=model,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        user_defined_symbols=["\n"],
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=UNK_ID,
        bos_id=BOS_ID,
        pad_id=-1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        max_sentence_length=MAX_SENTENCE_BYTES,
        minloglevel=2,
        **options,
    )
    return model.getvalue()


def _largest_vocab(files: Sequence[str], json_key: str, options: dict) -> Optional[int]:
    """The most pieces the input allows with these options: a trial run with a soft vocabulary
    limit (SentencePiece then stops when it runs out of pieces) and the EOS id among the first
    ones (at vocab_size - 1, a short vocabulary fails before SentencePiece can say so)."""
    import sentencepiece

    trial = {**options, "eos_id": BOS_ID + 1, "hard_vocab_limit": False}
    try:
        model = _train(files, json_key, {"lines": 0, "documents": 0, "paragraphs": 0, "bytes": 0}, **trial)
    except RuntimeError:
        return None
    return sentencepiece.SentencePieceProcessor(model_proto=model).get_piece_size()


def _training_failed(
    err: RuntimeError, files: Sequence[str], json_key: str, stats: dict, options: dict
) -> TokenizerTrainingError:
    """SentencePiece's assertion text → what is wrong with the input or the flags."""
    if stats.get("error") is not None:  # raised while reading the input
        return stats["error"]
    where = f"--input {name_files(files)}"
    if stats["paragraphs"] == 0:
        if stats["lines"] == 0:
            why = "empty (no lines)"
        elif stats["documents"] == 0:
            why = f"no documents: all {stats['lines']} lines are blank"
        else:
            why = f"no text: all {stats['documents']} documents have an empty or blank {json_key!r}"
        return TokenizerTrainingError(f"{where}: {why}; nothing to train a tokenizer on")
    vocab_size = options["vocab_size"]
    message = " ".join(str(err).split())
    required = re.search(r"smaller than required_chars\. (\d+) vs (\d+)", message)
    if required:
        return TokenizerTrainingError(
            f"--vocab-size {vocab_size}: too small for {where}: its characters, the 256 byte pieces and the "
            f"special tokens need at least {required.group(2)} pieces (at --character-coverage "
            f"{options['character_coverage']:g}); use --vocab-size {required.group(2)} or more"
        )
    largest = _largest_vocab(files, json_key, options)
    if largest is not None and largest < MIN_VOCAB_SIZE:
        return TokenizerTrainingError(
            f"{where}: too little text: its {stats['bytes']:,} bytes allow at most {largest} pieces "
            f"({options['model_type']}), fewer than the {MIN_VOCAB_SIZE} this tokenizer needs (--vocab-size "
            f"{vocab_size}); give more text"
        )
    if largest is not None and largest < vocab_size:
        return TokenizerTrainingError(
            f"--vocab-size {vocab_size}: too large for {where}: its {stats['bytes']:,} bytes of text allow at "
            f"most {largest} pieces ({options['model_type']}); use --vocab-size {largest} or less, or more text"
        )
    return TokenizerTrainingError(
        f"{where}: SentencePiece training failed (--vocab-size {vocab_size}, "
        f"--model-type {options['model_type']}): {message}"
    )


def train_sentencepiece(
    inputs: Sequence[str] | str,
    output_prefix: str,
    vocab_size: int = 4096,
    model_type: str = "bpe",
    json_key: str = "text",
    threads: int = 1,
    character_coverage: float = 1.0,
    overwrite: bool = True,
) -> dict:
    """Writes ``<output_prefix>.model`` and ``.vocab`` (atomically); returns a summary with the
    EOD id (``eod_id``). With ``overwrite`` false (the command line's default), existing files
    stop it before training."""
    import sentencepiece

    if model_type not in MODEL_TYPES:
        raise TokenizerTrainingError(f"--model-type {model_type!r} is not one of {', '.join(MODEL_TYPES)}")
    if vocab_size < MIN_VOCAB_SIZE:
        raise TokenizerTrainingError(
            f"--vocab-size {vocab_size}: too small (256 byte-fallback pieces, the "
            "special tokens and the characters need at least ~300)"
        )
    if threads < 1:
        raise TokenizerTrainingError(f"--threads: must be >= 1, got {threads}")
    if not 0.98 <= character_coverage <= 1:  # what SentencePiece accepts
        raise TokenizerTrainingError(f"--character-coverage {character_coverage:g}: expected a fraction in [0.98, 1]")
    targets = [output_prefix + ".model", output_prefix + ".vocab"]
    try:
        files = expand_inputs([inputs] if isinstance(inputs, str) else inputs)
        if not overwrite:
            refuse_existing(targets, "--output-prefix", output_prefix)
        make_output_dir(output_prefix, create=False)  # created once there is something to write
    except PreprocessError as err:
        raise TokenizerTrainingError(str(err)) from None
    stats = {"lines": 0, "documents": 0, "paragraphs": 0, "bytes": 0}
    options = {
        "model_type": model_type,
        "vocab_size": vocab_size,
        "character_coverage": character_coverage,
        "num_threads": threads,
    }
    start = time.perf_counter()
    try:
        model = _train(files, json_key, stats, eos_id=vocab_size - 1, **options)
    except RuntimeError as err:
        raise _training_failed(err, files, json_key, stats, options) from None
    seconds = time.perf_counter() - start

    sp = sentencepiece.SentencePieceProcessor(model_proto=model)
    # One "piece<TAB>score" line per id, as sentencepiece writes it, but with the newline piece
    # written as \n so that line i is id i.
    pieces = [sp.id_to_piece(i).replace("\n", "\\n") for i in range(sp.get_piece_size())]
    vocab_lines = "".join(f"{piece}\t{sp.get_score(i):g}\n" for i, piece in enumerate(pieces))
    contents = dict(zip(targets, (model, vocab_lines.encode("utf-8"))))
    try:
        make_output_dir(output_prefix)
    except PreprocessError as err:
        raise TokenizerTrainingError(str(err)) from None
    remove_stale_temps(targets, sys.stderr)
    temps = {path: temp_path(path) for path in targets}
    try:
        for path, data in contents.items():
            with open(temps[path], "wb") as handle:
                handle.write(data)
        if not overwrite:  # appeared while this run was training
            refuse_existing(targets, "--output-prefix", output_prefix)
        for path in targets:
            os.replace(temps[path], path)
    except PreprocessError as err:
        raise TokenizerTrainingError(str(err)) from None
    except OSError as err:
        raise TokenizerTrainingError(
            f"--output-prefix {output_prefix}: cannot write {err.filename or output_prefix}: {err.strerror or err}"
        ) from None
    finally:
        for temp in temps.values():
            if os.path.exists(temp):
                os.unlink(temp)
    return {
        "model": output_prefix + ".model",
        "vocab": output_prefix + ".vocab",
        "model_type": model_type,
        "vocab_size": sp.get_piece_size(),
        "eod_id": sp.eos_id(),
        "eod_piece": sp.id_to_piece(sp.eos_id()),
        "seconds": seconds,
        "documents": stats["documents"],
        "paragraphs": stats["paragraphs"],
        "bytes": stats["bytes"],
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="train_tokenizer",
        description="Train a SentencePiece tokenizer on JSONL documents (EOD/EOS id = vocab_size - 1).",
    )
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH", help="JSONL file(s) or globs")
    parser.add_argument("--json-key", default="text", help="the key holding each document's text")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.model and <prefix>.vocab")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    parser.add_argument("--character-coverage", type=float, default=1.0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="trainer threads (recorded in the .model: keep it fixed for identical files)",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing <prefix>.model/.vocab (without it, they stop the run at once)",
    )
    args = parser.parse_args(argv)
    try:
        summary = train_sentencepiece(
            args.input,
            args.output_prefix,
            args.vocab_size,
            args.model_type,
            args.json_key,
            args.threads,
            args.character_coverage,
            overwrite=args.overwrite,
        )
    except TokenizerTrainingError as err:
        print(f"train_tokenizer: error: {err}", file=sys.stderr)
        return 1
    print(
        f"wrote {summary['model']} and {summary['vocab']}: {summary['model_type']}, vocab {summary['vocab_size']}, "
        f"EOD {summary['eod_piece']} = id {summary['eod_id']} (use with preprocess --append-eod; "
        f"data.eod_token_id), trained on {summary['documents']:,} documents / {summary['paragraphs']:,} "
        f"paragraphs / {summary['bytes']:,} bytes in {summary['seconds']:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
