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
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Optional, Sequence

from megatron_let.preprocess import PreprocessError, expand_inputs

MODEL_TYPES = ("bpe", "unigram")
UNK_ID, BOS_ID = 0, 1
MAX_SENTENCE_BYTES = 1 << 16


class TokenizerTrainingError(ValueError):
    """Bad input or flags; the message names the file:line or the flag."""


def _paragraphs(files: Sequence[str], json_key: str, stats: dict) -> Iterator[str]:
    """Training sentences: the paragraphs (blocks between blank lines) of every document, so the
    ``\\n`` inside verse and speeches is learnt as it will be seen."""
    for path in files:
        with open(path, "rb") as handle:
            for line_no, raw in enumerate(handle, 1):
                if not raw.strip():
                    continue
                try:
                    text = json.loads(raw.decode("utf-8"))[json_key]
                except (UnicodeDecodeError, json.JSONDecodeError, TypeError, KeyError) as err:
                    raise TokenizerTrainingError(f"{path}:{line_no}: cannot read key {json_key!r}: "
                                                 f"{type(err).__name__}: {err}") from None
                if not isinstance(text, str):
                    raise TokenizerTrainingError(f"{path}:{line_no}: key {json_key!r} is not a string")
                stats["documents"] += 1
                stats["bytes"] += len(text.encode("utf-8"))
                for paragraph in text.split("\n\n"):
                    if paragraph.strip():
                        stats["paragraphs"] += 1
                        yield paragraph


def train_sentencepiece(inputs: Sequence[str] | str, output_prefix: str, vocab_size: int = 4096,
                        model_type: str = "bpe", json_key: str = "text", threads: int = 1,
                        character_coverage: float = 1.0) -> dict:
    """Writes ``<output_prefix>.model`` and ``.vocab`` (atomically); returns a summary with the
    EOD id (``eod_id``)."""
    import sentencepiece

    if model_type not in MODEL_TYPES:
        raise TokenizerTrainingError(f"--model-type {model_type!r} is not one of {', '.join(MODEL_TYPES)}")
    if vocab_size < 300:
        raise TokenizerTrainingError(f"--vocab-size {vocab_size}: too small (256 byte-fallback pieces, the "
                                     "special tokens and the characters need at least ~300)")
    if threads < 1:
        raise TokenizerTrainingError(f"--threads: must be >= 1, got {threads}")
    try:
        files = expand_inputs([inputs] if isinstance(inputs, str) else inputs)
    except PreprocessError as err:
        raise TokenizerTrainingError(str(err)) from None
    stats = {"documents": 0, "paragraphs": 0, "bytes": 0}
    model = io.BytesIO()
    start = time.perf_counter()
    try:
        sentencepiece.SentencePieceTrainer.train(
            sentence_iterator=_paragraphs(files, json_key, stats), model_writer=model,
            model_type=model_type, vocab_size=vocab_size, character_coverage=character_coverage,
            normalization_rule_name="identity", remove_extra_whitespaces=False, user_defined_symbols=["\n"],
            byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=vocab_size - 1, pad_id=-1,
            input_sentence_size=0, shuffle_input_sentence=False, max_sentence_length=MAX_SENTENCE_BYTES,
            num_threads=threads, minloglevel=2)
    except RuntimeError as err:
        message = str(err)
        if "Vocabulary size" in message:
            raise TokenizerTrainingError(f"--vocab-size {vocab_size}: {message.strip()}") from None
        raise TokenizerTrainingError(f"sentencepiece training failed: {message.strip()}") from None
    if stats["documents"] == 0:
        raise TokenizerTrainingError(f"--input {' '.join(files)}: no documents")
    seconds = time.perf_counter() - start

    sp = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    # One "piece<TAB>score" line per id, as sentencepiece writes it, but with the newline piece
    # written as \n so that line i is id i.
    pieces = [sp.id_to_piece(i).replace("\n", "\\n") for i in range(sp.get_piece_size())]
    vocab_lines = "".join(f"{piece}\t{sp.get_score(i):g}\n" for i, piece in enumerate(pieces))
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    targets = {output_prefix + ".model": model.getvalue(), output_prefix + ".vocab": vocab_lines.encode("utf-8")}
    temps = {path: f"{path}.tmp-{os.getpid()}" for path in targets}
    try:
        for path, data in targets.items():
            with open(temps[path], "wb") as handle:
                handle.write(data)
        for path in targets:
            os.replace(temps[path], path)
    except BaseException:
        for temp in temps.values():
            if os.path.exists(temp):
                os.unlink(temp)
        raise
    return {
        "model": output_prefix + ".model",
        "vocab": output_prefix + ".vocab",
        "model_type": model_type,
        "vocab_size": sp.get_piece_size(),
        "eod_id": sp.eos_id(),
        "eod_piece": sp.id_to_piece(sp.eos_id()),
        "seconds": seconds,
        **stats,
    }


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="train_tokenizer",
        description="Train a SentencePiece tokenizer on JSONL documents (EOD/EOS id = vocab_size - 1).")
    parser.add_argument("--input", nargs="+", required=True, metavar="PATH", help="JSONL file(s) or globs")
    parser.add_argument("--json-key", default="text", help="the key holding each document's text")
    parser.add_argument("--output-prefix", required=True, help="writes <prefix>.model and <prefix>.vocab")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--model-type", choices=MODEL_TYPES, default="bpe")
    parser.add_argument("--character-coverage", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="trainer threads (recorded in the .model: keep it fixed for identical files)")
    args = parser.parse_args(argv)
    try:
        summary = train_sentencepiece(args.input, args.output_prefix, args.vocab_size, args.model_type,
                                      args.json_key, args.threads, args.character_coverage)
    except TokenizerTrainingError as err:
        print(f"train_tokenizer: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {summary['model']} and {summary['vocab']}: {summary['model_type']}, vocab {summary['vocab_size']}, "
          f"EOD {summary['eod_piece']} = id {summary['eod_id']} (use with preprocess --append-eod; "
          f"data.eod_token_id), trained on {summary['documents']:,} documents / {summary['paragraphs']:,} "
          f"paragraphs / {summary['bytes']:,} bytes in {summary['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
