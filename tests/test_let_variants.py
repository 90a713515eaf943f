"""LET's alignment-loss variants through the real trainer: LET-CCA (alignment.loss: cca, the LET
paper's Table 5). One step under TP 2 with sequence parallelism (each rank holds half of the
tokens: the CCA statistics are summed across them) and under PP 2 equals the single-process step,
which equals plain autograd of Σ_m (LM_m + λ·L_CCA,m) / M computed without the hook."""

import json

import pytest
import torch

from conftest import tiny_config, torchrun, write_config

CCA = ["alignment.loss=cca", "alignment.cca_ridge=0.01", "alignment.lambda0=0.5"]
LAYOUTS = {
    "tp2_sequence_parallel": (2, ["parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true"]),
    "pp2": (2, ["parallel.pipeline_model_parallel_size=2"]),
}
LOSS_RTOL = 1e-6
GRAD_RTOL = 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory, token_data):
    root = tmp_path_factory.mktemp("cca")
    # Sequences of 64 tokens × 2: 128 samples of the teacher's 48 coordinates per microbatch.
    base = write_config(
        root / "base.yaml",
        tiny_config(token_data, optimizer={"clip_grad": 0.0}, training={"seq_length": 64}),
    )
    torchrun(1, "-m megatron_let.train", "--config", str(base), "--set", "training.train_iters=0",
             "--set", f"checkpoint.save={root / 'init'}")  # fmt: skip
    teacher_cfg = tiny_config(
        token_data,
        teacher=None,
        training={"train_iters": 2, "seq_length": 64},
        checkpoint={"save": str(root / "teacher")},
    )
    teacher_cfg["model"] = tiny_config(token_data)["teacher"]["model"]  # the architecture the base config names
    torchrun(1, "-m megatron_let.train", "--config", str(write_config(root / "teacher.yaml", teacher_cfg)))
    sets = [f"checkpoint.load={root / 'init'}", f"teacher.load={root / 'teacher'}", *CCA]

    def step(name, nproc, overrides):
        args = ["--config", str(base), "--out", str(root / name)]
        for item in sets + overrides:
            args += ["--set", item]
        torchrun(nproc, "tests/harness/one_step.py", *args)
        return json.loads((root / name / "metrics.json").read_text())

    metrics = {"reference": step("reference", 1, [])}
    for name, (nproc, overrides) in LAYOUTS.items():
        metrics[name] = step(name, nproc, overrides)
    args = ["--config", str(base), "--out", str(root / "grads.pt"), "--direct"]
    for item in sets:
        args += ["--set", item]
    torchrun(1, "tests/harness/read_grads.py", *args, *[str(root / name / "grads") for name in metrics])
    loaded = torch.load(root / "grads.pt")
    grads = {name: loaded[str(root / name / "grads")] for name in metrics}
    grads["direct"] = loaded["direct"]
    return metrics, grads


def max_relative_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp(min=1e-12)) for n in a)


def test_the_single_process_cca_step_equals_plain_autograd(runs):
    metrics, grads = runs
    # A mean canonical correlation: in [−1, 0], and far from 0 for a trained teacher's states.
    assert -1 < metrics["reference"]["alignment_loss"] < -0.05
    difference = max_relative_difference(grads["reference"], grads["direct"])
    print(f"\nCCA single process vs plain autograd: max relative gradient difference {difference:.2e}")
    assert difference < GRAD_RTOL


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_a_cca_step_under_tp_sp_and_pp_equals_the_single_process_step(runs, layout):
    metrics, grads = runs
    ours, ref = metrics[layout], metrics["reference"]
    assert ours["lm_loss"] == pytest.approx(ref["lm_loss"], rel=LOSS_RTOL)
    assert ours["alignment_loss"] == pytest.approx(ref["alignment_loss"], rel=LOSS_RTOL)
    difference = max_relative_difference(grads[layout], grads["reference"])
    print(f"\n{layout}: alignment loss {ours['alignment_loss']:.6f}, gradient difference {difference:.2e}")
    assert difference < GRAD_RTOL
