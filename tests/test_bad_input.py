"""Bad input to the trainer, as a new user gives it: each case runs the real CLI
(`megatron-let train`, one CPU process) and must exit non-zero with one message naming the file,
line, key or value — no traceback — and leave nothing half-written behind."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from conftest import REPO, VOCAB, tiny_config, torchrun, write_config


def train_cli(config: Path, *sets: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "megatron_let.cli", "train", "--config", str(config)]
    for item in sets:
        args += ["--set", item]
    return subprocess.run(
        args,
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory, token_data):
    """A real 2-step run with its checkpoint (and its config), to break in various ways."""
    root = tmp_path_factory.mktemp("saved")
    cfg = tiny_config(token_data, training={"train_iters": 2}, checkpoint={"save": str(root / "ckpt")})
    path = write_config(root / "run.yaml", cfg)
    torchrun(1, "-m megatron_let.train", "--config", str(path))
    return root, cfg


def copy_run(saved_run, tmp_path) -> tuple[Path, dict]:
    root, cfg = saved_run
    shutil.copytree(root / "ckpt", tmp_path / "ckpt")
    cfg = yaml.safe_load(yaml.safe_dump(cfg))
    cfg["checkpoint"] = {"save": str(tmp_path / "ckpt"), "load": str(tmp_path / "ckpt")}
    cfg["training"]["train_iters"] = 3
    return tmp_path / "ckpt" / "iter_0000002", cfg


def case_global_batch_zero(tmp_path, token_data, saved_run):
    return tiny_config(token_data, training={"global_batch_size": 0}), [], "training.global_batch_size: must be >= 1"


def case_global_batch_negative(tmp_path, token_data, saved_run):
    return tiny_config(token_data, training={"global_batch_size": -8}), [], "training.global_batch_size: must be >= 1"


def case_zero_layers(tmp_path, token_data, saved_run):
    return tiny_config(token_data), ["model.num_layers=0"], "--set: model.num_layers: must be >= 1"


def case_unknown_override(tmp_path, token_data, saved_run):
    return tiny_config(token_data), ["training.micro_batch_sise=2"], "training.micro_batch_sise"


def case_tokens_beyond_vocabulary(tmp_path, token_data, saved_run):
    cfg = tiny_config(token_data, model={"vocab_size": 256})
    cfg["teacher"]["model"]["vocab_size"] = 256
    return cfg, [], f"{token_data}.bin holds token id {VOCAB - 1}, but model.vocab_size is 256"


def case_missing_data(tmp_path, token_data, saved_run):
    return tiny_config(tmp_path / "nowhere"), [], f"data.data_path: {tmp_path / 'nowhere'}.bin does not exist"


def _copy_dataset(token_data, tmp_path) -> Path:
    prefix = tmp_path / "copy"
    for suffix in (".bin", ".idx"):
        shutil.copy(str(token_data) + suffix, str(prefix) + suffix)
    return prefix


def case_truncated_index(tmp_path, token_data, saved_run):
    prefix = _copy_dataset(token_data, tmp_path)
    idx = Path(str(prefix) + ".idx")
    idx.write_bytes(idx.read_bytes()[:100])
    return tiny_config(prefix), [], f"{idx} is truncated"


def case_truncated_index_header(tmp_path, token_data, saved_run):
    prefix = _copy_dataset(token_data, tmp_path)
    idx = Path(str(prefix) + ".idx")
    idx.write_bytes(idx.read_bytes()[:20])
    return tiny_config(prefix), [], f"{idx} is not a megatron index"


def case_short_bin(tmp_path, token_data, saved_run):
    prefix = _copy_dataset(token_data, tmp_path)
    data = Path(str(prefix) + ".bin")
    data.write_bytes(data.read_bytes()[:-40])
    return tiny_config(prefix), [], f"{data} is truncated"


def case_empty_dataset(tmp_path, token_data, saved_run):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    prefix = tmp_path / "empty"
    IndexedDatasetBuilder(str(prefix) + ".bin", dtype=np.int32).finalize(str(prefix) + ".idx")
    return tiny_config(prefix), [], f"{prefix}.idx holds no sequences"


def case_resume_other_vocabulary(tmp_path, token_data, saved_run):
    _, cfg = copy_run(saved_run, tmp_path)
    cfg["model"]["vocab_size"] = VOCAB - 4  # the padded shapes would even match
    cfg["teacher"]["model"]["vocab_size"] = VOCAB - 4
    return cfg, [], f"model.vocab_size: {VOCAB - 4} differs from {VOCAB} in the checkpoint"


def case_resume_without_common_state(tmp_path, token_data, saved_run):
    iteration_dir, cfg = copy_run(saved_run, tmp_path)
    (iteration_dir / "common.pt").unlink()
    cfg["checkpoint"]["load"] = str(iteration_dir)
    return cfg, [], f"checkpoint.load: {iteration_dir}: incomplete checkpoint (no common.pt)"


def case_resume_truncated_shard(tmp_path, token_data, saved_run):
    iteration_dir, cfg = copy_run(saved_run, tmp_path)
    shard = max(iteration_dir.glob("*.distcp"), key=lambda p: p.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    return cfg, [], f"checkpoint.load: {iteration_dir}: cannot read this checkpoint"


def case_resume_from_nothing(tmp_path, token_data, saved_run):
    cfg = tiny_config(token_data, checkpoint={"load": str(tmp_path / "empty")})
    (tmp_path / "empty").mkdir()
    return cfg, [], f"checkpoint.load: {tmp_path / 'empty'} holds no megatron-let checkpoint"


def case_teacher_checkpoint_incomplete(tmp_path, token_data, saved_run):
    iteration_dir, _ = copy_run(saved_run, tmp_path)
    (iteration_dir / "common.pt").unlink()
    cfg = tiny_config(token_data)
    cfg["teacher"] = {"load": str(iteration_dir)}
    return cfg, [], f"teacher.load: {iteration_dir}: incomplete checkpoint (no common.pt)"


def case_distillation_without_a_teacher(tmp_path, token_data, saved_run):
    return tiny_config(token_data, teacher=None, method="kd"), [], "method: kd needs a teacher: section"


def case_reverse_kl_over_the_top_k(tmp_path, token_data, saved_run):
    cfg = tiny_config(token_data, method="rkd", distillation={"reverse": True, "top_k": 16})
    return cfg, [], "distillation.reverse: reverse KL needs the teacher's whole distribution"


def case_salt_without_its_switch_step(tmp_path, token_data, saved_run):
    return tiny_config(token_data), ["method=salt"], "distillation.stop_step: method salt needs it"


def case_top_k_beyond_the_vocabulary(tmp_path, token_data, saved_run):
    cfg = tiny_config(token_data, method="kd", distillation={"top_k": VOCAB + 1})
    return cfg, [], f"distillation.top_k: must be in [1, model.vocab_size={VOCAB}] or null, got {VOCAB + 1}"


def case_a_negative_hint_weight(tmp_path, token_data, saved_run):
    return tiny_config(token_data), ["method=hldc", "hld.gamma=-0.1"], "hld.gamma: must be >= 0, got -0.1"


def case_a_hint_layer_the_student_lacks(tmp_path, token_data, saved_run):
    cfg = tiny_config(token_data, method="hldc", hld={"student_layer": 9})
    return cfg, [], "hld.student_layer: layer 9 does not exist: model.num_layers=4"


def case_a_teacher_cache_without_top_k(tmp_path, token_data, saved_run):
    cfg = tiny_config(token_data, method="kd", distillation={"top_k": None, "teacher_cache": str(tmp_path)})
    return cfg, [], "distillation.teacher_cache: a cache holds the teacher's top-k logits: set distillation.top_k"


def case_a_teacher_cache_that_is_not_one(tmp_path, token_data, saved_run):
    cfg = tiny_config(token_data, method="kd", distillation={"teacher_cache": str(tmp_path)})
    return cfg, [], f"{tmp_path / 'cache.json'}: no teacher cache here (write one with megatron-let cache-teacher)"


def case_a_split_that_gets_no_document(tmp_path, token_data, saved_run):
    # 64 documents: the valid split's 1% rounds to none (megatron would build it forever).
    return (
        tiny_config(token_data),
        ["data.split=98,1,1"],
        f"data.split: '98,1,1' leaves the valid split of {token_data} (64 documents) with no document",
    )


def case_a_flops_budget_in_no_unit(tmp_path, token_data, saved_run):
    return (
        tiny_config(token_data),
        ["training.train_iters=null", "training.flops_budget=OT2"],
        "training.flops_budget: 'OT2': give a number of FLOPs (e.g. 1.5e+18) or OT_k with k > 0",
    )


def case_a_flops_budget_and_train_iters(tmp_path, token_data, saved_run):
    return (
        tiny_config(token_data),  # its train_iters: 4
        ["training.flops_budget=1e9"],
        "training.flops_budget: give it or training.train_iters",
    )


def case_a_flops_budget_too_small_for_a_step(tmp_path, token_data, saved_run):
    return (
        tiny_config(token_data),
        ["training.train_iters=null", "training.flops_budget=1000"],
        "training.flops_budget: 1000 FLOPs buys no step of method let",
    )


def case_a_phase1_fraction_of_everything(tmp_path, token_data, saved_run):
    cfg = tiny_config(token_data, method="hldf", hld={"phase1_fraction": 1.0})
    return cfg, [], "hld.phase1_fraction: P1 is a share of the run's FLOPs: between 0 and 1 (exclusive), got 1.0"


def case_unknown_alignment_loss(tmp_path, token_data, saved_run):
    return (
        tiny_config(token_data),
        ["alignment.loss=cka"],
        "alignment.loss: 'cka' is not one of 'cosine', 'logsum', 'cca'",
    )


CASES = [value for name, value in sorted(globals().items()) if name.startswith("case_")]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[5:] for c in CASES])
def test_bad_input_is_named_without_a_traceback(tmp_path, token_data, saved_run, case):
    cfg, sets, expected = case(tmp_path, token_data, saved_run)
    path = write_config(tmp_path / "run.yaml", cfg)
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    result = train_cli(path, *sets)
    assert result.returncode == 2, result.stderr[-3000:]
    assert expected in result.stderr, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    # Nothing written or rewritten: no checkpoint, no metrics, no temp files.
    after = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    new_or_changed = sorted(
        str(p.relative_to(tmp_path)) for p in after if before.get(p) != after[p] and p.name != "run.yaml"
    )
    assert not new_or_changed, new_or_changed
