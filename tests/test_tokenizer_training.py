"""Tokenizer training on bad input, through the real command lines (``tools/train_tokenizer.py``,
``megatron-let train-tokenizer``): exit 1 with one line naming the input file, line, key or flag
and value (never SentencePiece's internal assertion text, never a traceback), and nothing written
or changed at the destination. The text is the real corpus of tests/test_preprocess.py.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from test_preprocess import corpus_dir, texts  # noqa: F401  (fixtures: a small real corpus)

from megatron_let.data.tokenizer_training import TokenizerTrainingError, main, train_sentencepiece

REPO = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {
    "tools": [sys.executable, str(REPO / "tools" / "train_tokenizer.py")],
    "cli": [sys.executable, "-m", "megatron_let.cli", "train-tokenizer"],
}
CLI_ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
LARGEST = re.compile(r"at most (\d+) pieces")


def run_entry(entry, args):
    return subprocess.run(
        ENTRY_POINTS[entry] + [str(a) for a in args], cwd=REPO, env=CLI_ENV, capture_output=True, text=True, timeout=300
    )


def jsonl(path, *records):
    """Writes records (a dict as JSON, bytes as they are), one per line."""
    path.write_bytes(b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in records))
    return path


def snapshot(directory):
    return {
        p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()
    }


# Each case: (tmp directory, real documents) → (input, extra flags, what the message must name). The
# output prefix is <tmp>/out/spm unless the case gives --output-prefix itself.


def case_empty_file(tmp, docs):
    path = jsonl(tmp / "empty.jsonl")  # no records: no bytes
    return path, [], ["--input", str(path), "empty"]


def case_blank_lines(tmp, docs):
    path = tmp / "blank.jsonl"
    path.write_bytes(b"\n\n  \n")
    return path, [], ["--input", str(path), "all 3 lines are blank"]


def case_empty_texts(tmp, docs):
    path = jsonl(tmp / "in.jsonl", {"text": ""}, {"text": "\n\n"}, {"text": "  "})
    return path, [], ["--input", str(path), "all 3 documents have an empty or blank 'text'"]


def case_vocab_too_large(tmp, docs):
    path = jsonl(tmp / "in.jsonl", *({"text": t} for t in docs[:2]))
    return path, ["--vocab-size", "30000"], ["--vocab-size 30000", str(path), "at most", "pieces (bpe)"]


def case_vocab_too_large_unigram(tmp, docs):
    path = jsonl(tmp / "in.jsonl", *({"text": t} for t in docs[:2]))
    return (
        path,
        ["--vocab-size", "30000", "--model-type", "unigram"],
        ["--vocab-size 30000", str(path), "at most", "pieces (unigram)"],
    )


def case_vocab_too_small_for_the_characters(tmp, docs):
    path = jsonl(tmp / "in.jsonl", *({"text": t} for t in docs))
    return path, ["--vocab-size", "300"], ["--vocab-size 300", str(path), "characters", "or more"]


def case_invalid_json(tmp, docs):
    path = jsonl(tmp / "in.jsonl", {"text": docs[0]}, json.dumps({"text": docs[1]})[:-3].encode())
    return path, [], [f"{path}:2: invalid JSON"]


def case_missing_key(tmp, docs):
    path = jsonl(tmp / "in.jsonl", *({"text": t} for t in docs[:2]))
    return path, ["--json-key", "content"], [f"{path}:1: missing key 'content'", "--json-key", "'text'"]


def case_latin1_line(tmp, docs):
    path = jsonl(
        tmp / "in.jsonl",
        {"text": docs[0]},
        json.dumps({"text": docs[1] + " déjà vu"}, ensure_ascii=False).encode("latin-1"),
    )
    return path, [], [f"{path}:2: not valid UTF-8"]


def case_lone_surrogate(tmp, docs):
    path = jsonl(tmp / "in.jsonl", {"text": docs[0]}, {"text": docs[1][:40] + "\udc80"})
    return path, [], [f"{path}:2: key 'text'", "surrogate"]


def case_output_under_a_file(tmp, docs):
    path = jsonl(tmp / "in.jsonl", *({"text": t} for t in docs[:2]))
    (tmp / "out" / "README").write_text(docs[2])
    prefix = tmp / "out" / "README" / "spm"
    return path, ["--output-prefix", prefix], ["--output-prefix", str(prefix), f"{tmp / 'out' / 'README'} is a file"]


def case_existing_output(tmp, docs):
    path = jsonl(tmp / "in.jsonl", *({"text": t} for t in docs[:2]))
    train_sentencepiece(str(path), str(tmp / "out" / "spm"), vocab_size=1000)
    return path, ["--vocab-size", "1000"], [str(tmp / "out" / "spm.model"), "--overwrite"]


def case_character_coverage(tmp, docs):
    path = jsonl(tmp / "in.jsonl", *({"text": t} for t in docs[:2]))
    return path, ["--character-coverage", "0.5"], ["--character-coverage 0.5"]


BAD_INPUTS = [  # (case, entry point)
    (case_empty_file, "tools"),
    (case_blank_lines, "cli"),
    (case_empty_texts, "tools"),
    (case_vocab_too_large, "cli"),
    (case_vocab_too_large_unigram, "tools"),
    (case_vocab_too_small_for_the_characters, "cli"),
    (case_invalid_json, "tools"),
    (case_missing_key, "cli"),
    (case_latin1_line, "tools"),
    (case_lone_surrogate, "cli"),
    (case_output_under_a_file, "tools"),
    (case_existing_output, "cli"),
    (case_character_coverage, "tools"),
]


@pytest.mark.parametrize("case, entry", BAD_INPUTS, ids=[c.__name__[5:] for c, _ in BAD_INPUTS])
def test_bad_input_is_named_and_nothing_is_written(case, entry, texts, tmp_path):  # noqa: F811
    out = tmp_path / "out"
    out.mkdir()
    data, flags, expected = case(tmp_path, texts)
    before = snapshot(out)
    args = ["--input", data] + flags
    if "--output-prefix" not in flags:
        args += ["--output-prefix", out / "spm"]
    result = run_entry(entry, args)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert "INTERNAL" not in result.stderr and ".cc(" not in result.stderr  # no SentencePiece assertion text
    assert result.stderr.startswith("train_tokenizer: error: ") and len(result.stderr.strip().splitlines()) == 1, (
        result.stderr
    )
    for needle in expected:
        assert needle in result.stderr, (needle, result.stderr)
    assert snapshot(out) == before


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_the_largest_vocab_size_named_is_the_largest(model_type, texts, tmp_path):  # noqa: F811
    """The --vocab-size the message offers trains; one more does not."""
    data = jsonl(tmp_path / "in.jsonl", *({"text": t} for t in texts[:2]))
    with pytest.raises(TokenizerTrainingError, match=r"--vocab-size 30000: too large") as raised:
        train_sentencepiece(str(data), str(tmp_path / "never"), vocab_size=30000, model_type=model_type)
    largest = int(LARGEST.search(str(raised.value)).group(1))
    assert 300 < largest < 30000
    summary = train_sentencepiece(str(data), str(tmp_path / "largest"), vocab_size=largest, model_type=model_type)
    assert summary["vocab_size"] == largest and summary["eod_id"] == largest - 1
    with pytest.raises(TokenizerTrainingError, match=f"at most {largest} pieces"):
        train_sentencepiece(str(data), str(tmp_path / "never"), vocab_size=largest + 1, model_type=model_type)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "largest.model", "largest.vocab"]


def test_the_smallest_vocab_size_named_trains(texts, tmp_path):  # noqa: F811
    data = jsonl(tmp_path / "in.jsonl", *({"text": t} for t in texts))
    with pytest.raises(TokenizerTrainingError, match=r"--vocab-size 300: too small") as raised:
        train_sentencepiece(str(data), str(tmp_path / "never"), vocab_size=300)
    smallest = int(re.search(r"use --vocab-size (\d+) or more", str(raised.value)).group(1))
    assert train_sentencepiece(str(data), str(tmp_path / "smallest"), vocab_size=smallest)["vocab_size"] == smallest


def test_overwrite_replaces_and_leaves_no_temporary_files(texts, tmp_path, capsys):  # noqa: F811
    data = jsonl(tmp_path / "in.jsonl", *({"text": t} for t in texts[:2]))
    prefix = str(tmp_path / "out" / "spm")  # a directory that does not exist yet
    assert main(["--input", str(data), "--output-prefix", prefix, "--vocab-size", "500"]) == 0
    assert main(["--input", str(data), "--output-prefix", prefix, "--vocab-size", "600"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert main(["--input", str(data), "--output-prefix", prefix, "--vocab-size", "600", "--overwrite"]) == 0
    import sentencepiece

    assert sentencepiece.SentencePieceProcessor(model_file=prefix + ".model").get_piece_size() == 600
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["spm.model", "spm.vocab"]
