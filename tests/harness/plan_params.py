"""Build the real trainer under several layouts in one torchrun launch and record what
``megatron-let plan`` estimates from the config alone: each rank's parameter count (target and
teacher), and the bytes one transformer layer saves for its backward pass.

Usage: plan_params.py --config BASE.yaml --out DIR [--set KEY=VALUE ...] --layout NAME[:KEY=VALUE,...] ...

For each layout this rank writes ``DIR/NAME/rank{r}.json``: its pipeline / tensor-parallel rank,
the numel of its model chunks and of its teacher (None where it has none), and the bytes of the
distinct tensors autograd saves in one forward of its first transformer layer (parameters excluded),
measured with ``torch.autograd.graph.saved_tensors_hooks``.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import harness_args  # tests/harness/, the script's own directory


def saved_activation_bytes(layer, seq: int, micro: int, hidden: int, sequence_parallel: bool, tp: int, rotary) -> int:
    """Bytes of the distinct storages autograd keeps from one forward of ``layer``, its parameters
    excluded (its input, the previous layer's output, included when saved)."""
    params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    local_seq = seq // tp if sequence_parallel else seq
    x = torch.randn(local_seq, micro, hidden, requires_grad=True)
    storages = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        layer(x, attention_mask=None, rotary_pos_emb=rotary)
    return sum(storages.values())


def main():
    parser = harness_args.parser()
    parser.add_argument("--layout", action="append", default=[])
    args = parser.parse_args()

    from megatron.core import parallel_state

    from megatron_let.model.gpt import unwrap
    from megatron_let.platform import distributed as parallel
    from megatron_let.run_config import load_run_config as load_config
    from megatron_let.training.trainer import Trainer

    for layout in args.layout:
        name, _, overrides = layout.partition(":")
        cfg = load_config(args.config, args.set + [o for o in overrides.split(",") if o])
        trainer = Trainer(cfg)
        gpts = [unwrap(chunk) for chunk in trainer.model]
        record = {
            "pp_rank": parallel_state.get_pipeline_model_parallel_rank(),
            "tp_rank": parallel_state.get_tensor_model_parallel_rank(),
            "target": sum(p.numel() for gpt in gpts for p in gpt.parameters()),
            "teacher": (
                sum(p.numel() for p in trainer.objective.teacher.model.parameters())
                if getattr(trainer.objective, "teacher", None) is not None
                else None
            ),
        }
        gpt = gpts[0]
        rotary = gpt.rotary_pos_emb(cfg.training.seq_length) if gpt.position_embedding_type == "rope" else None
        layer = gpt.decoder.layers[0]
        layer.train()
        record["layer_activation_bytes"] = saved_activation_bytes(
            layer,
            cfg.training.seq_length,
            cfg.training.micro_batch_size,
            cfg.model.hidden_size,
            cfg.parallel.sequence_parallel,
            cfg.parallel.tensor_model_parallel_size,
            rotary,
        )
        out = Path(args.out) / name
        out.mkdir(parents=True, exist_ok=True)
        (out / f"rank{dist.get_rank()}.json").write_text(json.dumps(record))
        trainer.close()
        dist.barrier()
    parallel.shutdown()


if __name__ == "__main__":
    sys.exit(main())
