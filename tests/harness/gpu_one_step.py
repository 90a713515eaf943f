"""GPU twin of one_step.py: ONE step of the real trainer under torchrun (NCCL, BF16, Transformer
Engine), its metrics and gradients dumped for comparison across layouts.

Writes <out>/metrics.json (rank 0: the step's metrics and what the built model really is) and
<out>/grads/ — a dist-checkpoint of the model whose weights are replaced by the step's gradients
(megatron DDP's fp32 main_grad, rounded to the BF16 of the weights: a relative error of at most
2^-9 per element), which gpu_grads.py reads back at TP=PP=1 through megatron's resharding.

Unlike one_step.py: collectives use CUDA tensors (NCCL has no CPU tensors), and the dump is written
with megatron's dist_checkpointing directly (the model's sharded state dict only).
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

import harness_args  # tests/harness/, the script's own directory


def main():
    args = harness_args.parse_args()

    from megatron.core import dist_checkpointing, parallel_state

    from megatron_let.model.gpt import unwrap
    from megatron_let.platform import distributed as parallel
    from megatron_let.run_config import load_run_config as load_config
    from megatron_let.training.trainer import Trainer

    trainer = Trainer(load_config(args.config, args.set))
    assert len(trainer.model) == 1, "gpu_one_step.py dumps one model chunk per rank (no virtual pipeline)"
    record = trainer.train_step()
    with torch.no_grad():
        for param in trainer.model[0].parameters():
            param.data.copy_(param.main_grad)

    out = Path(args.out)
    grads = out / "grads"
    if dist.get_rank() == 0:
        grads.mkdir(parents=True, exist_ok=True)  # dist_checkpointing.save wants an existing, empty directory
    dist.barrier()
    dist_checkpointing.save({"model": unwrap(trainer.model[0]).sharded_state_dict()}, str(grads))
    dist.barrier()

    owner = torch.tensor(
        [1.0 if getattr(trainer.objective, "teacher", None) is not None else 0.0], device=trainer.device
    )
    gathered = [torch.zeros_like(owner) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, owner)
    if dist.get_rank() == 0:
        config = trainer.config
        record.update(
            {
                "teacher_ranks": [i for i, flag in enumerate(gathered) if flag.item() > 0],
                "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
                "pipeline_model_parallel_size": parallel_state.get_pipeline_model_parallel_world_size(),
                "data_parallel_size": parallel_state.get_data_parallel_world_size(),
                "owner_stage": list(trainer.objective.owner_stage)
                if trainer.objective.owner_stage is not None
                else None,
                "deallocate_pipeline_outputs": config.deallocate_pipeline_outputs,
                "recompute_granularity": config.recompute_granularity,
                "recompute_method": config.recompute_method,
                "recompute_num_layers": config.recompute_num_layers,
                "params_dtype": str(config.params_dtype),
                "use_te": trainer.use_te,
            }
        )
        (out / "metrics.json").write_text(json.dumps(record))
    trainer.close()
    parallel.shutdown()


if __name__ == "__main__":
    sys.exit(main())
