"""Config validation: each error names the file, line and key."""

import dataclasses
import types
import typing

import pytest
import yaml

from megatron_let.config import (
    ConfigError,
    LETConfig,
    ModelConfig,
    TeacherConfig,
    load_config,
    resolve_layers,
    validate,
)

BASE = """\
device: cpu
model:
  num_layers: 4
  hidden_size: 64
  num_attention_heads: 4
  vocab_size: 512
teacher:
  model:
    num_layers: 2
    hidden_size: 48
    num_attention_heads: 3
    vocab_size: 512
data:
  mock_data: true
alignment:
  target_layer: 3
"""


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def error_of(tmp_path, text, overrides=()):
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text), list(overrides))
    return str(info.value)


def test_valid_config_loads_with_paper_defaults(tmp_path):
    cfg = load_config(write(tmp_path, BASE))
    assert cfg.alignment.lambda0 == 0.1 and cfg.alignment.target_layer == 3
    assert (cfg.optimizer.adam_beta1, cfg.optimizer.adam_beta2) == (0.9, 0.999)
    assert cfg.optimizer.weight_decay == 0.01 and cfg.optimizer.clip_grad == 1.0
    assert cfg.optimizer.lr_warmup_fraction == 0.1 and cfg.optimizer.lr_decay_style == "cosine"
    assert cfg.teacher.model.hidden_size == 48 and cfg.alignment_active


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    message = error_of(tmp_path, BASE + "training:\n  micro_batch_sise: 4\n")
    assert "run.yaml:18" in message and "training.micro_batch_sise: unknown key" in message
    assert "did you mean training.micro_batch_size" in message


def test_wrong_type_names_key(tmp_path):
    message = error_of(tmp_path, BASE.replace("hidden_size: 64", "hidden_size: wide"))
    assert "run.yaml:4" in message and "model.hidden_size: expected an integer" in message


def test_target_layer_beyond_num_layers(tmp_path):
    message = error_of(tmp_path, BASE.replace("target_layer: 3", "target_layer: 7"))
    assert "run.yaml:16" in message and "alignment.target_layer" in message and "num_layers=4" in message


def test_vocab_mismatch(tmp_path):
    text = BASE.replace("    vocab_size: 512", "    vocab_size: 1024")
    message = error_of(tmp_path, text)
    assert "teacher.model.vocab_size" in message and "1024" in message and "512" in message


def test_tp_cannot_split_heads(tmp_path):
    text = BASE + "parallel:\n  tensor_model_parallel_size: 3\n"
    message = error_of(tmp_path, text)
    assert "model.num_attention_heads" in message and "tensor_model_parallel_size=3" in message


def test_teacher_heads_need_not_divide_tp(tmp_path):
    # 3 teacher heads with TP=2: allowed, the teacher is replicated instead (teacher.py).
    cfg = load_config(write(tmp_path, BASE + "parallel:\n  tensor_model_parallel_size: 2\n"))
    assert cfg.parallel.tensor_model_parallel_size == 2


def test_overrides_are_validated_and_named(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["training.train_iters=7", "optimizer.lr=3e-4"])
    assert cfg.training.train_iters == 7 and cfg.optimizer.lr == 3e-4
    message = error_of(tmp_path, BASE, ["alignment.lambda0=lots"])
    assert message.startswith("--set: alignment.lambda0: expected a number")


def test_choices_and_missing_data(tmp_path):
    assert "alignment.loss" in error_of(tmp_path, BASE + "  loss: l2\n")
    assert "data.data_path" in error_of(tmp_path, BASE.replace("  mock_data: true\n", "  split: '1,0,0'\n"))


def test_invalid_yaml_and_missing_file(tmp_path):
    assert "invalid YAML" in error_of(tmp_path, "model: [unclosed\n")
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    "strategy,target,teacher",
    [
        ("L2E", 3, None),
        ("L2M", 2, None),
        ("L2L", 4, None),
        ("M2E", 3, 1),
        ("M2M", 2, 1),
        ("M2L", 4, 1),
    ],
)
def test_layer_strategies(tmp_path, strategy, target, teacher):
    cfg = load_config(write(tmp_path, BASE + f"  strategy: {strategy}\n"))
    assert resolve_layers(cfg) == (target, teacher)


def test_no_teacher_means_plain_pretraining(tmp_path):
    data = yaml.safe_load(BASE)
    data["teacher"] = None
    data["alignment"]["target_layer"] = 99  # irrelevant without a teacher
    path = tmp_path / "plain.yaml"
    path.write_text(yaml.safe_dump(data))
    assert not load_config(path).alignment_active


def test_cpu_mode_rejects_what_gloo_cannot_do(tmp_path):
    text = BASE + "parallel:\n  use_distributed_optimizer: true\n"
    assert "parallel.use_distributed_optimizer: needs reduce-scatter" in error_of(tmp_path, text)


def test_a_strategy_chooses_layer_k_even_for_a_shallow_target(tmp_path):
    """L2E on a 2-layer target: E is its last layer (the default target_layer 3 does not exist and
    must not be checked when a strategy decides)."""
    text = BASE.replace("num_layers: 4", "num_layers: 2", 1).replace("  target_layer: 3\n", "  strategy: L2E\n")
    cfg = load_config(write(tmp_path, text))
    assert resolve_layers(cfg) == (2, None)


def test_a_choice_outside_its_literal_names_file_line_key_and_choices(tmp_path):
    message = error_of(tmp_path, BASE.replace("  vocab_size: 512\n", "  vocab_size: 512\n  normalization: Foo\n", 1))
    assert message.endswith("run.yaml:7: model.normalization: 'Foo' is not one of 'RMSNorm', 'LayerNorm'"), message


def _literal_keys(cls, prefix=""):
    """(dotted key, allowed values, is a list) for every Literal-typed field under cls."""
    for f in dataclasses.fields(cls):
        annotation = typing.get_type_hints(cls)[f.name]
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if typing.get_origin(annotation) in (typing.Union, types.UnionType):
            annotation = args[0]
        if dataclasses.is_dataclass(annotation):
            yield from _literal_keys(annotation, f"{prefix}{f.name}.")
        elif (
            typing.get_origin(annotation) is list
            and typing.get_origin(typing.get_args(annotation)[0]) is typing.Literal
        ):
            yield f"{prefix}{f.name}", typing.get_args(typing.get_args(annotation)[0]), True
        elif typing.get_origin(annotation) is typing.Literal:
            yield f"{prefix}{f.name}", typing.get_args(annotation), False


LITERAL_KEYS = list(_literal_keys(LETConfig))


def test_the_enumerated_keys_are_literal_fields():
    keys = {key for key, _, _ in LITERAL_KEYS}
    assert {"device", "model.normalization", "teacher.model.activation", "teacher.precision"} <= keys
    assert {"alignment.strategy", "training.exit_signals", "parallel.recompute_modules"} <= keys


@pytest.mark.parametrize("key,allowed,is_list", LITERAL_KEYS, ids=[key for key, _, _ in LITERAL_KEYS])
def test_every_literal_field_is_checked_on_load(tmp_path, key, allowed, is_list):
    value = "[bogus]" if is_list else "bogus"
    message = error_of(tmp_path, BASE, [f"{key}={value}"])
    assert message.startswith(f"--set: {key}: 'bogus' is not one of {', '.join(repr(a) for a in allowed)}"), message


def test_an_optional_choice_may_be_unset_and_a_list_of_choices_is_checked_item_by_item(tmp_path):
    cfg = load_config(write(tmp_path, BASE), ["parallel.recompute_granularity=null", "alignment.strategy=null"])
    assert cfg.parallel.recompute_granularity is None and cfg.alignment.strategy is None
    message = error_of(tmp_path, BASE, ["training.exit_signals=[SIGTERM, SIGKILL]"])
    assert message.startswith("--set: training.exit_signals: 'SIGKILL' is not one of 'SIGTERM', ")
    assert "(or null)" in error_of(tmp_path, BASE, ["parallel.recompute_granularity=all"])


def test_choices_of_a_config_built_in_code_are_checked():
    """validate() checks the Literal fields of any LETConfig, e.g. a teacher architecture filled in
    from a Hugging Face config after loading."""
    cfg = LETConfig(device="cpu", teacher=TeacherConfig(model=ModelConfig(activation="tanh")))  # type: ignore[arg-type]
    cfg.data.mock_data = True
    with pytest.raises(ConfigError, match=r"teacher\.model\.activation: 'tanh' is not one of 'swiglu', 'gelu'"):
        validate(cfg)
