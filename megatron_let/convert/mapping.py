"""Declarative Hugging Face ↔ megatron-core mappings, one pair of tables per architecture, each
read forwards by ``convert import`` and backwards by ``convert export``.

An :class:`Architecture` (``llama.py``, ``gpt_neox.py``, ``opt.py``) holds

* ``config``: :class:`Setting` rows between config.json keys (transformers' config attributes)
  and megatron-let ``ModelConfig`` fields. Most are one of

  ========================================  ============================  ==========================
  row                                        import (HF → megatron)        export (megatron → HF)
  ========================================  ============================  ==========================
  ``same(hf_key, field)``                    field = value                 hf_key = field
  ``inverted(hf_key, field)``                field = not value             hf_key = not field
  ``choice(hf_key, field, {hf: megatron})``  looked up; others refused     looked up backwards
  ``fixed(field, value)``                    field = value                 any other value refused
  ``required(hf_key, value)``                any other value refused       hf_key = value
  ``written(hf_key, field)``                 (nothing: training-only)      hf_key = field
  ``unused(field, ...)``                     (fields that mean nothing here: megatron's vocab padding, ...)
  ========================================  ============================  ==========================

  and a few rows with two small functions of their own (GQA groups, head_dim, RoPE).

* ``params``: :class:`Param` rows, each one megatron parameter (a ``GPTModel.state_dict()`` name
  at TP=1 under megatron-let's layer specs) ↔ one or more HF tensors. Names carry ``{i}`` for the
  layer index; each HF tensor's shape is written in config.json terms (``"num_key_value_heads*head_dim"``),
  so a config.json that disagrees with the weights is reported as that key and both values. A
  :class:`Transform` and its inverse turn the HF tensors into the megatron one and back:
  ``IDENTITY``, ``QKV`` (megatron's interleaved [q heads of a group; k; v] per query group, GQA),
  ``PER_HEAD_QKV`` (GPT-NeoX's fused per-head [q; k; v], megatron's layout with one head per group),
  ``GATE_UP`` (SwiGLU [gate; up] in ``linear_fc1``), ``VOCAB`` (pad to megatron's padded vocab /
  drop the padding), ``Offset(n)`` (rows a position table has in front, OPT's 2) and
  ``Constant(v)`` (a norm without parameters). ``when=`` selects rows (biases, untied output layer).

Import = run every row forwards; export = run every row backwards. Nothing else is written per
architecture.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Optional

import torch

from megatron_let.config import ModelConfig
from megatron_let.convert.common import ConversionError, fuse_gate_up, fuse_qkv, pad_vocab, split_qkv
from megatron_let.platform.resources import progress

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# What a transform and a condition see


@dataclass
class Layout:
    """One conversion's sizes: the megatron ModelConfig, the HF config values (transformers'
    config object on import, the config table's output on export), megatron's padded vocab rows,
    where the HF config came from (for messages), and ``kept``: HF rows megatron has no place for
    (OPT's first two position rows), set aside on import and put back on export."""

    model: ModelConfig
    hf: Any
    vocab_rows: int
    source: str
    kept: dict[str, torch.Tensor] = field(default_factory=dict)

    def hf_value(self, key: str, default=None):
        if isinstance(self.hf, Mapping):
            return self.hf.get(key, default)
        return getattr(self.hf, key, default)

    @property
    def heads(self) -> int:
        return self.model.num_attention_heads

    @property
    def groups(self) -> int:
        return self.model.num_query_groups or self.model.num_attention_heads

    @property
    def head_dim(self) -> int:
        return self.model.kv_channels or self.model.hidden_size // self.model.num_attention_heads


def BIASES(layout: Layout) -> bool:
    return layout.model.add_bias_linear


def UNTIED(layout: Layout) -> bool:
    return layout.model.untie_embeddings_and_output_weights


def TIED(layout: Layout) -> bool:
    return not layout.model.untie_embeddings_and_output_weights


def ALWAYS(layout: Layout) -> bool:
    return True


def hf_flag(key: str, default: bool = True, expected: bool = True) -> Callable[[Layout], bool]:
    """A condition on a config.json flag (e.g. OPT's ``layer_norm_elementwise_affine``)."""

    def condition(layout: Layout) -> bool:
        value = layout.hf_value(key, default)
        return bool(default if value is None else value) == expected

    condition.__name__ = f"{key}={expected}"
    return condition


# ---------------------------------------------------------------------------------------------
# Transforms: HF tensors (in the row's order) ↔ one megatron tensor


class Transform:
    def to_megatron(self, tensors: list[torch.Tensor], layout: Layout, names: list[str]) -> torch.Tensor:
        raise NotImplementedError

    def to_hf(self, tensor: torch.Tensor, layout: Layout, names: list[str]) -> list[torch.Tensor]:
        raise NotImplementedError


class Identity(Transform):
    def to_megatron(self, tensors, layout, names):
        (tensor,) = tensors
        return tensor

    def to_hf(self, tensor, layout, names):
        return [tensor]


class FuseQKV(Transform):
    """Separate q, k, v projections (weights or biases) ↔ megatron's ``linear_qkv``: per query
    group, that group's query heads, then its key head, then its value head."""

    def to_megatron(self, tensors, layout, names):
        return fuse_qkv(*tensors, layout.groups)

    def to_hf(self, tensor, layout, names):
        return list(split_qkv(tensor, layout.heads, layout.groups, layout.head_dim))


class PerHeadQKV(Identity):
    """GPT-NeoX's fused ``query_key_value``: per head [q; k; v], which is megatron's layout with one
    query head per group, so the tensor is the same both ways (megatron must not use GQA)."""

    def to_megatron(self, tensors, layout, names):
        if layout.groups != layout.heads:
            raise ConversionError(
                f"{names[0]}: a per-head fused QKV needs as many query groups as heads "
                f"({layout.groups} vs {layout.heads})"
            )
        return super().to_megatron(tensors, layout, names)

    def to_hf(self, tensor, layout, names):
        self.to_megatron([tensor], layout, names)  # the same check
        return [tensor]


class GateUp(Transform):
    """SwiGLU: HF gate and up projections ↔ megatron's ``linear_fc1`` = [gate; up]
    (megatron computes ``act(first half) * second half``)."""

    def to_megatron(self, tensors, layout, names):
        return fuse_gate_up(*tensors)

    def to_hf(self, tensor, layout, names):
        return list(tensor.chunk(2, dim=0))


class Vocab(Transform):
    """Vocabulary rows: padded with zeros to megatron's padded vocab on import, the padding
    dropped on export."""

    def to_megatron(self, tensors, layout, names):
        (tensor,) = tensors
        return pad_vocab(tensor, layout.vocab_rows)

    def to_hf(self, tensor, layout, names):
        return [tensor[: layout.model.vocab_size]]


class Offset(Transform):
    """A position table with ``rows`` extra rows in front (OPT looks position p up at p + 2):
    megatron row p = HF row p + rows. The front rows are kept aside on import (the checkpoint
    records them) and put back on export; a checkpoint without them gets zeros (logged)."""

    def __init__(self, rows: int):
        self.rows = rows

    def to_megatron(self, tensors, layout, names):
        (tensor,) = tensors
        layout.kept[names[0]] = tensor[: self.rows].clone()
        return tensor[self.rows :]

    def to_hf(self, tensor, layout, names):
        front = layout.kept.get(names[0])
        if front is None:
            logger.info(
                "%s: the first %d rows (never looked up for a real position) are not in megatron "
                "checkpoints; written as zeros",
                names[0],
                self.rows,
            )
            front = tensor.new_zeros(self.rows, *tensor.shape[1:])
        return [torch.cat([front.to(tensor.dtype), tensor])]


class Constant(Transform):
    """No HF tensor: a norm without parameters is megatron's norm with weight ``value`` (1) or bias
    0, everywhere. On export the megatron tensor must still be that constant."""

    def __init__(self, value: float):
        self.value = value

    def to_megatron(self, tensors, layout, names):
        return torch.full((layout.model.hidden_size,), float(self.value))

    def to_hf(self, tensor, layout, names):
        if not torch.all(tensor == self.value):
            raise ConversionError(
                f"the model's trained norm parameters are not all {self.value}: they need "
                "a Hugging Face config whose norms have parameters"
            )
        return []


IDENTITY = Identity()
QKV = FuseQKV()
PER_HEAD_QKV = PerHeadQKV()
GATE_UP = GateUp()
VOCAB = Vocab()


# ---------------------------------------------------------------------------------------------
# Parameter rows


@dataclass(frozen=True)
class HF:
    """One Hugging Face tensor: its name (``{i}`` = layer index) and its shape in config.json terms
    (each dimension a key, a number, or a product / sum of them: ``"num_attention_heads*head_dim"``)."""

    name: str
    shape: tuple[str, ...]


def hf(name: str, *shape: str) -> HF:
    return HF(name, tuple(shape))


@dataclass(frozen=True)
class Param:
    """megatron parameter ↔ HF tensors. ``megatron=None``: an HF tensor with nothing to convert
    (a tied output matrix some checkpoints also store): read if present, never written."""

    megatron: Optional[str]
    hf: tuple[HF, ...]
    transform: Transform = IDENTITY
    when: Callable[[Layout], bool] = ALWAYS

    @property
    def per_layer(self) -> bool:
        return "{i}" in (self.megatron or "") or any("{i}" in t.name for t in self.hf)


def param(
    megatron: Optional[str], *tensors: HF, transform: Transform = IDENTITY, when: Callable[[Layout], bool] = ALWAYS
) -> Param:
    return Param(megatron, tuple(tensors), transform, when)


# ---------------------------------------------------------------------------------------------
# Config rows


def _name(hf_config) -> str:
    return getattr(hf_config, "_name_or_path", None) or getattr(hf_config, "model_type", None) or "config"


def unsupported(hf_config, setting: str, value, why: str = "") -> ConversionError:
    return ConversionError(f"{_name(hf_config)}: {setting}={value!r} is not supported{': ' + why if why else ''}")


def get(hf_config, key: str, default=None):
    value = getattr(hf_config, key, None)
    return default if value is None else value


@dataclass(frozen=True)
class Setting:
    """config.json keys ``hf`` ↔ ModelConfig fields ``megatron``. ``to_megatron(hf_config)`` gives
    the fields (import); ``to_hf(model)`` the keys (export); ``check(model)`` says why a model
    cannot be written with this row (a value the HF architecture cannot express), or None."""

    hf: tuple[str, ...]
    megatron: tuple[str, ...]
    to_megatron: Callable[[Any], dict] = lambda hf_config: {}
    to_hf: Callable[[ModelConfig], dict] = lambda model: {}
    check: Callable[[ModelConfig], Optional[str]] = lambda model: None
    requirement: Optional[str] = None  # for messages: what the architecture needs ("normalization='RMSNorm'")


def same(hf_key: str, megatron: str, cast: Callable = lambda v: v) -> Setting:
    return Setting(
        (hf_key,), (megatron,), lambda c: {megatron: cast(getattr(c, hf_key))}, lambda m: {hf_key: getattr(m, megatron)}
    )


def inverted(hf_key: str, megatron: str, default: bool) -> Setting:
    return Setting(
        (hf_key,),
        (megatron,),
        lambda c: {megatron: not bool(get(c, hf_key, default))},
        lambda m: {hf_key: not getattr(m, megatron)},
    )


def choice(hf_key: str, megatron: str, values: dict) -> Setting:
    back = {v: k for k, v in values.items()}

    def to_megatron(c):
        value = getattr(c, hf_key)
        if value not in values:
            raise unsupported(c, hf_key, value, f"supported: {', '.join(values)}")
        return {megatron: values[value]}

    def check(m):
        value = getattr(m, megatron)
        return None if value in back else f"{megatron}={value!r}"

    return Setting(
        (hf_key,),
        (megatron,),
        to_megatron,
        lambda m: {hf_key: back[getattr(m, megatron)]},
        check,
        f"{megatron} in {sorted(back)}",
    )


def fixed(megatron: str, value, accepts: Optional[Callable[[ModelConfig], bool]] = None) -> Setting:
    """A ModelConfig field this architecture always has (``accepts``: other values that mean the same)."""

    def check(m):
        ok = accepts(m) if accepts is not None else getattr(m, megatron) == value
        return None if ok else f"{megatron}={getattr(m, megatron)!r}"

    return Setting((), (megatron,), lambda c: {megatron: value}, lambda m: {}, check, f"{megatron}={value!r}")


def required(hf_key: str, value, why: str = "", default=None) -> Setting:
    """A config.json value megatron can only compute with this setting (absent = ``default``)."""

    def to_megatron(c):
        given = getattr(c, hf_key, None)
        given = (value if default is None else default) if given is None else given
        if given != value:
            raise unsupported(c, hf_key, given, why)
        return {}

    return Setting((hf_key,), (), to_megatron, lambda m: {hf_key: value})


def written(hf_key: str, megatron: str) -> Setting:
    """Export only: a training-time setting (dropout) that an import leaves at megatron-let's
    default (a converted teacher never trains)."""
    return Setting((hf_key,), (megatron,), lambda c: {}, lambda m: {hf_key: getattr(m, megatron)})


def unused(*megatron: str) -> Setting:
    """ModelConfig fields that mean nothing for this architecture (or for any HF model, like
    megatron's vocab padding): neither read nor written."""
    return Setting((), tuple(megatron))


# Rows with code of their own, shared by the architectures.


def query_groups() -> Setting:
    """GQA: num_key_value_heads (= heads for multi-head attention) ↔ num_query_groups (None)."""

    def to_megatron(c):
        heads = c.num_attention_heads
        kv = get(c, "num_key_value_heads", heads)
        return {"num_query_groups": kv if kv != heads else None}

    return Setting(
        ("num_key_value_heads",),
        ("num_query_groups",),
        to_megatron,
        lambda m: {"num_key_value_heads": m.num_query_groups or m.num_attention_heads},
    )


def head_dim() -> Setting:
    """head_dim ↔ kv_channels (None when hidden_size / heads)."""

    def to_megatron(c):
        dim = get(c, "head_dim", c.hidden_size // c.num_attention_heads)
        return {"kv_channels": dim if dim * c.num_attention_heads != c.hidden_size else None}

    return Setting(
        ("head_dim",),
        ("kv_channels",),
        to_megatron,
        lambda m: {"head_dim": m.kv_channels or m.hidden_size // m.num_attention_heads},
    )


def ffn(hf_key: str) -> Setting:
    return Setting(
        (hf_key,),
        ("ffn_hidden_size",),
        lambda c: {"ffn_hidden_size": getattr(c, hf_key)},
        lambda m: {hf_key: m.ffn_hidden_size or 4 * m.hidden_size},
    )


def plain_heads() -> tuple[Setting, Setting]:
    """Architectures without GQA or a free head_dim."""
    return (
        fixed("num_query_groups", None, lambda m: m.num_query_groups in (None, m.num_attention_heads)),
        fixed("kv_channels", None, lambda m: m.kv_channels in (None, m.hidden_size // m.num_attention_heads)),
    )


def rope_parameters(c) -> dict:
    """``rope_type``, ``rope_theta``, ``partial_rotary_factor`` and any scaling parameters
    (transformers 5's ``rope_parameters``; older spellings too)."""
    params = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ConversionError(f"{_name(c)}: per-layer-type RoPE parameters are not supported")
    params.setdefault("rope_type", params.pop("type", "default"))
    params.setdefault("rope_theta", getattr(c, "rope_theta", None) or getattr(c, "rotary_emb_base", None) or 10000.0)
    params.setdefault(
        "partial_rotary_factor", getattr(c, "partial_rotary_factor", None) or getattr(c, "rotary_pct", None) or 1.0
    )
    return params


def rotary_base(c, theta: float) -> int:
    """megatron's ``rotary_base`` is an int."""
    if float(theta) != int(theta):
        raise ConversionError(f"{_name(c)}: rope_theta={theta} is not an integer (megatron's rotary_base is)")
    return int(theta)


# ---------------------------------------------------------------------------------------------
# Shapes in config.json terms

_TERM = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$|^\d+$")


def _evaluate(expression: str, lookup: Callable[[str], Any]) -> tuple[int, list[str]]:
    """``"a*b+2"`` → (value, the keys it uses)."""
    total, keys = 0, []
    for term in expression.split("+"):
        product = 1
        for factor in term.split("*"):
            factor = factor.strip()
            if not _TERM.match(factor):
                raise ValueError(f"bad shape expression {expression!r}")
            if factor.isdigit():
                product *= int(factor)
            else:
                value = lookup(factor)
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ConversionError(f"{factor}={value!r} is not an integer")
                keys.append(factor)
                product *= value
        total += product
    return total, keys


def _check_shape(layout: Layout, spec: HF, name: str, tensor: torch.Tensor, where: str) -> None:
    def lookup(key):
        return layout.hf_value(key)

    dims = []
    for expression in spec.shape:
        try:
            dims.append((expression, *_evaluate(expression, lookup)))
        except ConversionError as err:
            raise ConversionError(f"{layout.source}: {err} (needed for the shape of {name})") from None
    expected = tuple(value for _, value, _ in dims)
    actual = tuple(tensor.shape)
    if actual == expected:
        return
    shown = "(" + ", ".join(map(str, actual)) + ")"
    if len(actual) != len(expected):
        raise ConversionError(
            f"{where}: {name} has shape {shown}, expected {len(expected)} dimensions ({', '.join(spec.shape)})"
        )
    for (expression, value, keys), size in zip(dims, actual):
        if value == size:
            continue
        if keys == [expression]:
            key = keys[0]
            raise ConversionError(
                f"{layout.source}: {key}={value} disagrees with the weights: {name} in {where} "
                f"has shape {shown}, which means {key}={size}"
            )
        if len(set(keys)) == 1:  # e.g. max_position_embeddings+2: solve for the key
            key = keys[0]
            base = _evaluate(expression, lambda k: 0)[0]
            slope = _evaluate(expression, lambda k: 1)[0] - base
            implied = (size - base) / slope if slope else None
            implied_text = (
                f", which means {key}={int(implied)}" if implied is not None and implied == int(implied) else ""
            )
            raise ConversionError(
                f"{layout.source}: {key}={layout.hf_value(key)} disagrees with the weights: {name} "
                f"in {where} has shape {shown}, not {expression} = {value}{implied_text}"
            )
        values = ", ".join(f"{k}={layout.hf_value(k)}" for k in dict.fromkeys(keys))
        raise ConversionError(
            f"{layout.source}: {values} disagree with the weights: {name} in {where} has "
            f"shape {shown}, not {expression} = {value}"
        )


# ---------------------------------------------------------------------------------------------
# An architecture: both tables and the two directions


@dataclass(frozen=True)
class Architecture:
    model_type: str  # config.json model_type
    hf_class: str  # the transformers model class an export loads as
    config_class: str  # its transformers config class
    family: str  # in messages: "only Llama-style models ..."
    base_prefix: str  # the base model's attribute (``model.``): base-model checkpoints lack it
    config: tuple[Setting, ...]
    params: tuple[Param, ...]
    ignored: tuple[str, ...] = ()  # HF tensors with nothing to convert (buffers old checkpoints saved)

    # ----- config

    def model_config(self, hf_config) -> ModelConfig:
        """Import: transformers' config object → ModelConfig (unsupported settings refused)."""
        fields: dict = {}
        for row in self.config:
            fields.update(row.to_megatron(hf_config))
        return ModelConfig(**fields)

    def problems(self, model: ModelConfig) -> list[str]:
        return [p for p in (row.check(model) for row in self.config) if p is not None]

    def check_exportable(self, model: ModelConfig) -> None:
        wrong = self.problems(model)
        if wrong:
            needs = ", ".join(row.requirement for row in self.config if row.requirement)
            raise ConversionError(
                f"only {self.family} models ({needs}) export as {self.hf_class}; this model has {', '.join(wrong)}"
            )

    def hf_values(self, model: ModelConfig) -> dict:
        """Export: ModelConfig → config.json values (architecture keys only)."""
        self.check_exportable(model)
        values: dict = {}
        for row in self.config:
            values.update(row.to_hf(model))
        return values

    def hf_config(self, model: ModelConfig, token_ids: Mapping[str, Any]):
        """The transformers config object for an export. Token ids not given are set to None
        (unknown), never to the config class's defaults."""
        import transformers

        ids = {key: token_ids.get(key) for key in ("bos_token_id", "eos_token_id", "pad_token_id")}
        config_class = getattr(transformers, self.config_class)
        return config_class(**self.hf_values(model), **ids, architectures=[self.hf_class])

    # ----- weights

    def _rows(self, layout: Layout) -> Iterator[tuple[Param, Optional[str], list[str]]]:
        """(row, megatron name, HF names) with the layer index filled in: global rows, then layer
        by layer, each in table order."""
        rows = [r for r in self.params if r.when(layout)]
        for row in rows:
            if not row.per_layer:
                yield row, row.megatron, [t.name for t in row.hf]
        for i in range(layout.model.num_layers):
            for row in rows:
                if row.per_layer:
                    yield (
                        row,
                        row.megatron.format(i=i) if row.megatron else None,
                        [t.name.format(i=i) for t in row.hf],
                    )

    def _layer_key(self) -> str:
        return next(row.hf[0] for row in self.config if row.megatron == ("num_layers",))

    def _check_layer_count(self, layout: Layout, weights) -> None:
        prefixes = {t.name.split("{i}")[0] for row in self.params for t in row.hf if "{i}" in t.name}
        variants = prefixes | {p[len(self.base_prefix) :] for p in prefixes if p.startswith(self.base_prefix)}
        pattern = re.compile("^(?:" + "|".join(re.escape(p) for p in sorted(variants)) + r")(\d+)\.")
        found = {int(m.group(1)) for m in map(pattern.match, weights.names()) if m}
        layers = layout.model.num_layers
        if found and max(found) + 1 != layers:
            raise ConversionError(
                f"{layout.source}: {self._layer_key()}={layers} disagrees with the weights: "
                f"{weights.source} has layers 0..{max(found)}"
            )

    def to_megatron(self, layout: Layout, weights) -> dict[str, torch.Tensor]:
        """Import: HF tensors → the full (TP=1) megatron state dict, every row forwards."""
        self._check_layer_count(layout, weights)
        state = {}
        rows = list(self._rows(layout))
        for row, megatron, names in progress(rows, desc="reading Hugging Face weights", unit="param", leave=False):
            if row.megatron is None:  # read if present (so it counts as used), nothing to convert
                for spec, name in zip(row.hf, names):
                    if name in weights:
                        _check_shape(layout, spec, name, weights.take(name), weights.file_of(name))
                continue
            tensors = []
            for spec, name in zip(row.hf, names):
                tensor = weights.take(name)
                _check_shape(layout, spec, name, tensor, weights.file_of(name))
                tensors.append(tensor)
            state[megatron] = row.transform.to_megatron(tensors, layout, names).contiguous()
        leftover = weights.unused(self.ignored)
        if leftover:
            raise ConversionError(
                f"{weights.source}: weights the {self.model_type} mapping does not use: "
                f"{', '.join(leftover[:10])}{' ...' if len(leftover) > 10 else ''}"
            )
        return state

    def to_hf(self, layout: Layout, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Export: the full (TP=1) megatron state dict → HF tensors, every row backwards."""
        out, used = {}, set()
        rows = list(self._rows(layout))
        for row, megatron, names in progress(rows, desc=f"converting to {self.hf_class}", unit="param", leave=False):
            if row.megatron is None:
                continue
            if megatron not in state:
                raise ConversionError(f"{layout.source}: the checkpoint has no {megatron!r}")
            used.add(megatron)
            tensors = row.transform.to_hf(state[megatron], layout, names)
            for spec, name, tensor in zip(row.hf, names, tensors):
                _check_shape(layout, spec, name, tensor, f"the converted {megatron}")
                out[name] = _owning(tensor)
        leftover = sorted(k for k in state if k not in used and not k.endswith("._extra_state"))
        if leftover:
            raise ConversionError(
                f"{layout.source}: parameters the {self.model_type} mapping has no place for: "
                f"{', '.join(leftover[:10])}{' ...' if len(leftover) > 10 else ''}"
            )
        return out


def _owning(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor that is all of its storage: views (a split QKV, the vocab without its padding)
    are copied, since safetensors refuses tensors that share memory."""
    tensor = tensor.contiguous()
    whole = tensor.storage_offset() == 0 and tensor.untyped_storage().nbytes() == tensor.numel() * tensor.element_size()
    return tensor if whole else tensor.clone()


def covered_fields(architecture: Architecture) -> set[str]:
    """ModelConfig fields the config table reads or writes (a test checks every field is covered)."""
    return {name for row in architecture.config for name in row.megatron}


def model_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(ModelConfig)}
