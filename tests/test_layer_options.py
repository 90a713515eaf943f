"""Layers, fused kernels and activation recompute: what the config asks for is what megatron gets,
and what cannot work is refused naming the flag."""

import subprocess
import sys

import pytest

from megatron_let.config import ConfigError, ModelConfig, TrainingConfig, load_config
from megatron_let.model.gpt import Kernels, select_kernels, transformer_config, use_transformer_engine

from conftest import REPO, write_config

CPU_RUN = {
    "device": "cpu",
    "model": {
        "num_layers": 4,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "vocab_size": 512,
        "max_position_embeddings": 64,
    },
    "data": {"mock_data": True},
    "training": {"seq_length": 32},
}


def config_error(tmp_path, overrides):
    with pytest.raises(ConfigError) as info:
        load_config(write_config(tmp_path / "run.yaml", CPU_RUN), overrides)
    return str(info.value)


@pytest.mark.parametrize(
    "overrides, key, message",
    [
        (["parallel.recompute_granularity=everything"], "parallel.recompute_granularity", "is not one of"),
        (["parallel.recompute_granularity=full"], "parallel.recompute_method", "needs uniform or block"),
        (
            ["parallel.recompute_granularity=full", "parallel.recompute_method=uniform"],
            "parallel.recompute_num_layers",
            "needs 1..4",
        ),
        (
            [
                "parallel.recompute_granularity=full",
                "parallel.recompute_method=block",
                "parallel.recompute_num_layers=3",
                "parallel.pipeline_model_parallel_size=2",
            ],
            "parallel.recompute_num_layers",
            "needs 1..2",
        ),
        (
            ["parallel.recompute_method=block"],
            "parallel.recompute_method",
            "only applies with recompute_granularity: full",
        ),
        (
            ["parallel.recompute_granularity=selective", "parallel.recompute_modules=[moe]"],
            "parallel.recompute_modules",
            "'moe' is not one of",
        ),
        (["training.transformer_impl=transformer_engine"], "training.transformer_impl", "needs device: cuda"),
        (["training.transformer_impl=te"], "training.transformer_impl", "is not one of"),
    ],
)
def test_bad_recompute_and_layer_flags_are_named(tmp_path, overrides, key, message):
    error = config_error(tmp_path, overrides)
    assert key in error and message in error, error


def test_recompute_flags_reach_megatron(tmp_path):
    from megatron_let.model.gpt import recompute_options

    cfg = load_config(
        write_config(tmp_path / "run.yaml", CPU_RUN),
        ["parallel.recompute_granularity=full", "parallel.recompute_method=uniform", "parallel.recompute_num_layers=2"],
    )
    config = transformer_config(cfg.model, on_cpu=True, recompute=recompute_options(cfg.parallel))
    assert (config.recompute_granularity, config.recompute_method, config.recompute_num_layers) == (
        "full",
        "uniform",
        2,
    )


def test_missing_transformer_engine_is_an_error_on_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformer_engine", None)  # `import transformer_engine` raises
    with pytest.raises(ConfigError, match="training.transformer_impl=auto: Transformer Engine does not import"):
        use_transformer_engine("auto", on_cpu=False)
    assert use_transformer_engine("local", on_cpu=False) is False  # asked for: megatron's local layers
    assert use_transformer_engine("auto", on_cpu=True) is False


@pytest.mark.parametrize("apex", [True, False], ids=["with_apex", "without_apex"])
def test_kernels_default_on_with_transformer_engine_only(monkeypatch, apex):
    # Gradient-accumulation fusion also needs apex's extension, for megatron's own output layer.
    monkeypatch.setitem(sys.modules, "fused_weight_gradient_mlp_cuda", object() if apex else None)
    llama = ModelConfig(activation="swiglu", position_embedding_type="rope")
    assert select_kernels(TrainingConfig(), llama, use_te=True) == Kernels(True, True, True, apex, True)
    assert select_kernels(TrainingConfig(), llama, use_te=False) == Kernels()
    # GPT-2 style gelu without biases: megatron cannot fuse its activation; nor RoPE without RoPE.
    gpt2 = ModelConfig(activation="gelu", add_bias_linear=False, position_embedding_type="learned_absolute")
    assert select_kernels(TrainingConfig(), gpt2, use_te=True) == Kernels(False, True, False, apex, True)
    assert select_kernels(TrainingConfig(bias_dropout_fusion=False), llama, use_te=True).bias_dropout_fusion is False


@pytest.mark.parametrize(
    "flag, model",
    [
        ("bias_swiglu_fusion", ModelConfig(activation="relu")),
        ("apply_rope_fusion", ModelConfig()),
        ("gradient_accumulation_fusion", ModelConfig()),
    ],
)
def test_a_fusion_that_cannot_work_is_named(flag, model):
    with pytest.raises(ConfigError, match=f"training.{flag}=true"):
        select_kernels(TrainingConfig(**{flag: True}), model, use_te=False)


def test_kernels_reach_megatron():
    kernels = select_kernels(
        TrainingConfig(bias_swiglu_fusion=True, bias_dropout_fusion=True), ModelConfig(), use_te=False
    )
    config = transformer_config(ModelConfig(), on_cpu=True, kernels=kernels)
    assert config.bias_activation_fusion and config.bias_dropout_fusion
    assert not (config.apply_rope_fusion or config.gradient_accumulation_fusion or config.cross_entropy_loss_fusion)


def test_train_on_gpu_without_transformer_engine_says_so(tmp_path):
    try:
        import transformer_engine  # noqa: F401

        pytest.skip("Transformer Engine is installed here")
    except Exception:
        pass
    path = write_config(tmp_path / "run.yaml", dict(CPU_RUN, device="cuda"))
    result = subprocess.run(
        [sys.executable, "-m", "megatron_let.cli", "train", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    assert "training.transformer_impl=auto: Transformer Engine does not import" in result.stderr
    assert "training.transformer_impl: local" in result.stderr
