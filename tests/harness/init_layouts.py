"""Build the real trainer under several layouts in one torchrun launch; dump each layout's initial
weights and take one step.

Usage: init_layouts.py --config BASE.yaml --out DIR [--set KEY=VALUE ...] --layout NAME[:KEY=VALUE,...] ...

Every layout must use all the processes of the launch (TP × PP × DP = world size). For each, in
order, this rank writes ``DIR/NAME/rank{r}.pt``: its fresh weights as pieces of the global tensors,
``{global name: [(global shape, [(start, stop) or index per dim], tensor)]}``, named and placed by
megatron's own ``sharded_state_dict`` (global layer numbers, TP offsets, GLU halves), so the test can
reassemble full tensors; then one training step, whose metrics rank 0 writes to ``DIR/NAME/metrics.json``.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import harness_args  # tests/harness/, the script's own directory


def weight_pieces(model_chunks) -> dict:
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    from megatron_let.model.gpt import unwrap

    pieces: dict = {}
    for chunk in model_chunks:
        for value in nested_values(unwrap(chunk).sharded_state_dict()):
            if isinstance(value, ShardedTensorFactory):
                built = value.build()
                items = list(nested_values(built)) if isinstance(built, (dict, list)) else [built]
            else:
                items = [value]
            for item in items:
                if not isinstance(item, ShardedTensor):
                    continue  # _extra_state objects
                where = [(s.start, s.stop) if isinstance(s, slice) else int(s) for s in item.global_slice()]
                pieces.setdefault(item.key, []).append(
                    (tuple(item.global_shape), where, item.data.detach().float().cpu().clone())
                )
    return pieces


def main():
    parser = harness_args.parser()
    parser.add_argument("--layout", action="append", default=[])
    args = parser.parse_args()

    from megatron_let.platform import distributed as parallel
    from megatron_let.run_config import load_run_config as load_config
    from megatron_let.training.trainer import Trainer

    for layout in args.layout:
        name, _, overrides = layout.partition(":")
        cfg = load_config(args.config, args.set + [o for o in overrides.split(",") if o])
        trainer = Trainer(cfg)
        out = Path(args.out) / name
        out.mkdir(parents=True, exist_ok=True)
        torch.save(weight_pieces(trainer.model), out / f"rank{dist.get_rank()}.pt")
        record = trainer.train_step()
        if dist.get_rank() == 0:
            (out / "metrics.json").write_text(json.dumps(record))
        trainer.close()
        dist.barrier()
    parallel.shutdown()


if __name__ == "__main__":
    sys.exit(main())
