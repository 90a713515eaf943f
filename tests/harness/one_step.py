"""Run ONE training step of the real trainer under torchrun and dump what it computed.

Writes <out>/metrics.json (rank 0: the step's metrics) and <out>/grads/ — a dist-checkpoint whose
"weights" are the step's (DP-reduced, pre-clip-free) gradients, so that a single process can read
them back at TP=PP=1 through megatron's own resharding and compare them parameter by parameter.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import harness_args  # tests/harness/, the script's own directory


def main():
    args = harness_args.parse_args()

    from megatron_let import checkpoint
    from megatron_let.platform import distributed as parallel
    from megatron_let.run_config import load_run_config as load_config
    from megatron_let.training.trainer import Trainer

    cfg = load_config(args.config, args.set)
    trainer = Trainer(cfg)
    record = trainer.train_step()
    for chunk in trainer.model:
        for param in chunk.parameters():
            param.data.copy_(param.main_grad)
    out = Path(args.out)
    checkpoint.save_checkpoint(
        out / "grads", trainer.iteration, trainer.model, None, None, trainer.consumed_samples, {}
    )
    owners = torch.tensor([1.0 if getattr(trainer.objective, "teacher", None) is not None else 0.0])
    gathered = [torch.zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, owners)
    if dist.get_rank() == 0:
        record["teacher_ranks"] = [i for i, g in enumerate(gathered) if g.item() > 0]
        record["deallocate_pipeline_outputs"] = trainer.config.deallocate_pipeline_outputs
        record["recompute_granularity"] = trainer.config.recompute_granularity
        (out / "metrics.json").write_text(json.dumps(record))
    trainer.close()
    parallel.shutdown()


if __name__ == "__main__":
    sys.exit(main())
