"""JSONL → Megatron indexed datasets (``.bin``/``.idx``), flag-compatible with Megatron-LM's
``tools/preprocess_data.py``.

Each ``--json-keys`` key becomes its own dataset ``<output-prefix>_<key>_document.{bin,idx}``,
written with megatron-core's ``IndexedDatasetBuilder`` (``uint16`` tokens when the vocabulary has
fewer than 65500 entries, else ``int32``, as Megatron-LM chooses), so ``IndexedDataset`` and
``GPTDataset`` read it as they read Megatron-LM's own output.

What this adds to Megatron-LM's script:

* a malformed line stops the run with ``file:line: reason`` (or, with ``--skip-bad-lines``, is
  counted and reported) instead of a traceback from a worker;
* outputs appear only when complete: everything is written under temporary names that are
  renamed at the very end, and removed if the run fails or is interrupted (SIGINT/SIGTERM);
* the bytes written do not depend on ``--workers`` (results are consumed in input order);
* documents that tokenize to nothing are left out (Megatron-LM writes zero-length documents).

Tokenizers (``build_tokenizer``): ``GPT2BPETokenizer`` (``--vocab-file`` encoder.json/vocab.json,
``--merge-file`` vocab.bpe/merges.txt; byte-level BPE through the ``tokenizers`` library, EOD
``<|endoftext|>``), ``SentencePieceTokenizer`` (``--tokenizer-model`` a ``.model``; EOD = its
``</s>`` id, as Megatron-LM's GPT SentencePiece tokenizer), ``HuggingFaceTokenizer``
(``--tokenizer-model`` a ``tokenizer.json`` or a local directory; EOD = its EOS token).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing import Pool
from pathlib import Path
from typing import IO, Iterable, Iterator, Optional, Sequence

import numpy as np

TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer",
                   "HuggingFaceTokenizer")
# EOS/EOD spellings tried, in order, for a bare tokenizer.json that does not say which it uses.
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>")
MAX_REPORTED_BAD_LINES = 5
MB = 1e6  # throughput is reported in MB = 10^6 bytes of input JSONL


class PreprocessError(Exception):
    """A problem with the inputs, the tokenizer or the flags; the message names the file/line/flag."""


# ---------------------------------------------------------------------------------------------
# Tokenizers


class Tokenizer:
    """What preprocessing needs of a tokenizer: ``tokenize(text) -> list[int]``, ``eod`` (the id
    appended by ``--append-eod``; None when the tokenizer has none) and ``vocab_size``.

    Pickles as the arguments it was built from, so worker processes rebuild it themselves.
    """

    def __init__(self, spec: tuple, encode, eod: Optional[int], vocab_size: int):
        self._spec, self._encode = spec, encode
        self.eod, self.vocab_size = eod, vocab_size

    def tokenize(self, text: str) -> list[int]:
        return self._encode(text)

    @property
    def name(self) -> str:
        return self._spec[0]

    def __reduce__(self):
        return build_tokenizer, self._spec


def _existing_file(path: Optional[str], flag: str, tokenizer_type: str) -> str:
    if path is None:
        raise PreprocessError(f"{flag} is required for --tokenizer-type {tokenizer_type}")
    if not os.path.isfile(path):
        raise PreprocessError(f"{flag} {path}: no such file")
    return path


def build_tokenizer(tokenizer_type: str, tokenizer_model: Optional[str] = None,
                    vocab_file: Optional[str] = None, merge_file: Optional[str] = None) -> Tokenizer:
    """A tokenizer as Megatron-LM's ``--tokenizer-type`` (and its file flags) would select it."""
    spec = (tokenizer_type, tokenizer_model, vocab_file, merge_file)
    if tokenizer_type == "GPT2BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

        vocab = _existing_file(vocab_file, "--vocab-file", tokenizer_type)
        merges = _existing_file(merge_file, "--merge-file", tokenizer_type)
        try:
            tok = HFTokenizer(models.BPE.from_file(vocab, merges))
        except Exception as err:  # the tokenizers library raises plain Exceptions
            raise PreprocessError(f"--vocab-file {vocab} / --merge-file {merges}: not a GPT-2 BPE: {err}") from None
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        eod = tok.token_to_id("<|endoftext|>")
        return Tokenizer(spec, lambda text: tok.encode(text).ids, eod, tok.get_vocab_size())

    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        import sentencepiece

        model = _existing_file(tokenizer_model, "--tokenizer-model", tokenizer_type)
        try:
            sp = sentencepiece.SentencePieceProcessor(model_file=model)
        except (OSError, RuntimeError) as err:
            raise PreprocessError(f"--tokenizer-model {model}: not a SentencePiece model: {err}") from None
        eod = sp.eos_id() if sp.eos_id() >= 0 else None
        return Tokenizer(spec, sp.encode, eod, sp.get_piece_size())

    if tokenizer_type == "HuggingFaceTokenizer":
        if tokenizer_model is None:
            raise PreprocessError(f"--tokenizer-model is required for --tokenizer-type {tokenizer_type}")
        path = Path(tokenizer_model)
        if path.is_dir() and (path / "tokenizer_config.json").exists():
            from transformers import AutoTokenizer

            try:
                hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
            except (OSError, ValueError) as err:
                raise PreprocessError(f"--tokenizer-model {path}: cannot load: {err}") from None
            # Megatron-LM's HuggingFaceTokenizer: tokenizer(text).input_ids, EOD = eos_token_id.
            return Tokenizer(spec, lambda text: hf(text, verbose=False)["input_ids"], hf.eos_token_id, len(hf))
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise PreprocessError(f"--tokenizer-model {tokenizer_model}: neither a tokenizer.json nor a "
                                  "directory with tokenizer.json or tokenizer_config.json")
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as err:
            raise PreprocessError(f"--tokenizer-model {path}: not a tokenizers JSON file: {err}") from None
        eod = next((tok.token_to_id(t) for t in EOD_CANDIDATES if tok.token_to_id(t) is not None), None)
        return Tokenizer(spec, lambda text: tok.encode(text).ids, eod, tok.get_vocab_size(with_added_tokens=True))

    raise PreprocessError(f"--tokenizer-type {tokenizer_type!r} is not one of {', '.join(TOKENIZER_TYPES)}")


# ---------------------------------------------------------------------------------------------
# Encoding (runs in the worker processes)


class _Encoder:
    """One JSONL line → ``{key: token array}``, or the reason it is malformed (a string)."""

    def __init__(self, tokenizer, json_keys: Sequence[str], append_eod: bool, dtype):
        self.tokenizer, self.json_keys, self.append_eod, self.dtype = tokenizer, json_keys, append_eod, dtype

    def __call__(self, item: tuple[int, int, bytes]):
        file_index, line_no, raw = item
        return file_index, line_no, len(raw), self._encode(raw)

    def _encode(self, raw: bytes):
        if not raw.strip():
            return None  # a blank line: no document
        try:
            record = json.loads(raw.decode("utf-8").lstrip("\ufeff"))  # tolerate a byte-order mark
        except UnicodeDecodeError as err:
            return f"not valid UTF-8 ({err.reason} at byte {err.start})"
        except json.JSONDecodeError as err:
            return f"invalid JSON: {err.msg} (column {err.colno})"
        if not isinstance(record, dict):
            return f"expected a JSON object, got {type(record).__name__}"
        docs = {}
        for key in self.json_keys:
            if key not in record:
                found = ", ".join(repr(k) for k in list(record)[:5]) or "none"
                return f"missing key {key!r} (--json-keys; keys found: {found})"
            text = record[key]
            if not isinstance(text, str):
                return f"key {key!r} is a JSON {type(text).__name__}, expected a string"
            ids = self.tokenizer.tokenize(text)
            if ids and self.append_eod:
                ids = list(ids) + [self.tokenizer.eod]
            docs[key] = np.asarray(ids, dtype=self.dtype)
        return docs


_worker_encoder: Optional[_Encoder] = None


def _init_worker(tokenizer, json_keys, append_eod, dtype) -> None:
    global _worker_encoder
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _worker_encoder = _Encoder(tokenizer, json_keys, append_eod, dtype)


def _encode_in_worker(item):
    return _worker_encoder(item)


# ---------------------------------------------------------------------------------------------
# The run


def expand_inputs(patterns: Iterable[str]) -> list[str]:
    """Files and globs → an ordered list of files (each glob sorted; duplicates dropped)."""
    files: list[str] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise PreprocessError(f"--input {pattern}: no file matches")
        for path in matches:
            if not os.path.isfile(path):
                raise PreprocessError(f"--input {path}: no such file")
            if path not in files:
                files.append(path)
    if not files:
        raise PreprocessError("--input: no input files")
    return files


def _read_lines(files: Sequence[str]) -> Iterator[tuple[int, int, bytes]]:
    for file_index, path in enumerate(files):
        try:
            handle = open(path, "rb")
        except OSError as err:
            raise PreprocessError(f"--input {path}: {err.strerror}") from None
        with handle:
            for line_no, raw in enumerate(handle, 1):
                yield file_index, line_no, raw


def output_prefixes(output_prefix: str, json_keys: Sequence[str]) -> dict[str, str]:
    """Megatron-LM's naming: ``<output-prefix>_<key>_document`` per JSON key."""
    return {key: f"{output_prefix}_{key}_document" for key in json_keys}


@dataclass
class _Output:
    """One key's dataset, written under temporary names until ``commit``."""

    prefix: str
    dtype: type
    builder: object = None
    tokens: int = 0
    documents: int = 0
    empty: int = 0
    tmp_bin: str = field(init=False)
    tmp_idx: str = field(init=False)

    def __post_init__(self):
        tag = f".tmp-{os.getpid()}"
        self.tmp_bin, self.tmp_idx = self.prefix + ".bin" + tag, self.prefix + ".idx" + tag

    def open(self):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.builder = IndexedDatasetBuilder(self.tmp_bin, dtype=self.dtype)

    def add(self, tokens: np.ndarray):
        if tokens.size == 0:
            self.empty += 1
            return
        self.builder.add_document(tokens, [int(tokens.size)])
        self.tokens += int(tokens.size)
        self.documents += 1

    def finalize(self):
        self.builder.finalize(self.tmp_idx)

    def commit(self):
        # The old .idx goes first: a crash between the renames leaves a .bin with no index
        # (not a dataset) rather than a new .bin under an old index.
        if os.path.exists(self.prefix + ".idx"):
            os.unlink(self.prefix + ".idx")
        os.replace(self.tmp_bin, self.prefix + ".bin")
        os.replace(self.tmp_idx, self.prefix + ".idx")

    def discard(self):
        if self.builder is not None and not self.builder.data_file.closed:
            self.builder.data_file.close()
        for path in (self.tmp_bin, self.tmp_idx):
            if os.path.exists(path):
                os.unlink(path)


def preprocess(inputs: Sequence[str] | str, output_prefix: str, tokenizer: Tokenizer,
               json_keys: Sequence[str] = ("text",), workers: int = 1, append_eod: bool = False,
               skip_bad_lines: bool = False, log_interval: int = 1000, chunksize: int = 32,
               log: Optional[IO[str]] = None) -> dict:
    """Tokenize JSONL ``inputs`` (files or globs) into one indexed dataset per JSON key.

    Returns a summary: documents (well-formed JSONL records; per key, those that tokenize to
    nothing are counted in empty_documents instead of written), tokens (total and per key), bytes
    (of input read), seconds, mb_per_s, docs_per_s, bad_lines and the first few
    bad_line_locations, blank_lines, outputs (key → dataset prefix), dtype, workers and files.
    Raises PreprocessError naming ``file:line`` for a malformed line unless ``skip_bad_lines``.
    """
    log = sys.stderr if log is None else log
    files = expand_inputs([inputs] if isinstance(inputs, str) else inputs)
    json_keys = list(json_keys)
    if not json_keys or len(set(json_keys)) != len(json_keys):
        raise PreprocessError(f"--json-keys: expected distinct keys, got {json_keys}")
    if workers < 1:
        raise PreprocessError(f"--workers: must be >= 1, got {workers}")
    if append_eod and tokenizer.eod is None:
        raise PreprocessError(f"--append-eod: the {getattr(tokenizer, 'name', 'given')} tokenizer has no "
                              "end-of-document (EOS) token")
    from megatron.core.datasets.indexed_dataset import DType

    dtype = DType.optimal_dtype(tokenizer.vocab_size)
    Path(output_prefix).parent.mkdir(parents=True, exist_ok=True)
    outputs = {key: _Output(prefix, dtype) for key, prefix in output_prefixes(output_prefix, json_keys).items()}

    records = bad = blank = total_bytes = 0
    bad_locations: list[str] = []
    start = time.perf_counter()
    pool = None
    try:
        for out in outputs.values():
            out.open()
        lines = _read_lines(files)
        if workers == 1:
            results = map(_Encoder(tokenizer, json_keys, append_eod, dtype), lines)
        else:
            pool = Pool(workers, initializer=_init_worker, initargs=(tokenizer, json_keys, append_eod, dtype))
            results = pool.imap(_encode_in_worker, lines, chunksize)
        for file_index, line_no, nbytes, docs in results:
            total_bytes += nbytes
            if docs is None:
                blank += 1
                continue
            if isinstance(docs, str):
                where = f"{files[file_index]}:{line_no}"
                if not skip_bad_lines:
                    raise PreprocessError(f"{where}: {docs} (--skip-bad-lines skips such lines)")
                bad += 1
                if len(bad_locations) < MAX_REPORTED_BAD_LINES:
                    bad_locations.append(f"{where}: {docs}")
                continue
            for key, tokens in docs.items():
                outputs[key].add(tokens)
            records += 1
            if log_interval > 0 and records % log_interval == 0:
                elapsed = max(time.perf_counter() - start, 1e-9)
                print(f"processed {records} documents ({records / elapsed:.1f} docs/s, "
                      f"{total_bytes / MB / elapsed:.2f} MB/s)", file=log, flush=True)
        if pool is not None:
            pool.close()
            pool.join()
            pool = None
        for out in outputs.values():
            out.finalize()
        for out in outputs.values():
            out.commit()
    except BaseException:
        if pool is not None:
            pool.terminate()
            pool.join()
        for out in outputs.values():
            out.discard()
        raise
    seconds = time.perf_counter() - start
    tokens = {key: out.tokens for key, out in outputs.items()}
    return {
        "documents": records,
        "tokens": sum(tokens.values()),
        "tokens_per_key": tokens,
        "bytes": total_bytes,
        "seconds": seconds,
        "mb_per_s": total_bytes / MB / max(seconds, 1e-9),
        "docs_per_s": records / max(seconds, 1e-9),
        "bad_lines": bad,
        "bad_line_locations": bad_locations,
        "blank_lines": blank,
        "empty_documents": {key: out.empty for key, out in outputs.items()},
        "outputs": {key: out.prefix for key, out in outputs.items()},
        "dtype": np.dtype(dtype).name,
        "workers": workers,
        "files": files,
    }


def format_summary(summary: dict) -> str:
    lines = [
        f"documents: {summary['documents']:,}   tokens: {summary['tokens']:,}   "
        f"input: {summary['bytes']:,} bytes in {summary['seconds']:.2f} s "
        f"({summary['mb_per_s']:.2f} MB/s, {summary['docs_per_s']:.1f} docs/s, {summary['workers']} workers)",
    ]
    for key, prefix in summary["outputs"].items():
        empty = summary["empty_documents"][key]
        note = f", {empty} empty documents left out" if empty else ""
        lines.append(f"  {key}: {prefix}.bin/.idx ({summary['tokens_per_key'][key]:,} tokens, "
                     f"{summary['dtype']}{note})")
    if summary["blank_lines"]:
        lines.append(f"  {summary['blank_lines']} blank lines ignored")
    if summary["bad_lines"]:
        lines.append(f"  skipped {summary['bad_lines']} malformed lines; first ones:")
        lines += [f"    {where}" for where in summary["bad_line_locations"]]
    return "\n".join(lines)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that the partial outputs are removed on the way out."""


def _raise_on_sigterm(signum, frame):
    raise Terminated(f"signal {signum}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preprocess_data",
        description="Tokenize JSONL documents into Megatron indexed datasets (.bin/.idx), "
                    "like Megatron-LM's tools/preprocess_data.py.")
    group = parser.add_argument_group("input data")
    group.add_argument("--input", nargs="+", required=True, metavar="PATH",
                       help="JSONL file(s), one JSON object per line; globs allowed")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys to extract from each JSON object; one output dataset per key")
    group.add_argument("--skip-bad-lines", action="store_true",
                       help="skip (and count) malformed lines instead of stopping at the first")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model", default=None,
                       help="SentencePiece .model, or HuggingFace tokenizer.json / local directory")
    group.add_argument("--vocab-file", default=None, help="GPT-2 BPE encoder.json / vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT-2 BPE vocab.bpe / merges.txt")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="outputs are <output-prefix>_<key>_document.bin/.idx")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument("--log-interval", type=int, default=1000, help="a progress line every N documents (0: none)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm) if in_main_thread else None
    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file)
        summary = preprocess(args.input, args.output_prefix, tokenizer, json_keys=args.json_keys,
                             workers=args.workers, append_eod=args.append_eod, skip_bad_lines=args.skip_bad_lines,
                             log_interval=args.log_interval)
    except PreprocessError as err:
        print(f"preprocess_data: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        print("preprocess_data: interrupted; no output written", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
