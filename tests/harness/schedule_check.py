"""Run the real trainer step by step across S_stop and record, per rank, λ, the alignment metrics,
and whether the teacher, its hook and its memory are gone afterwards."""

import gc
import json
import sys
import weakref
from pathlib import Path

import torch.distributed as dist

import harness_args  # tests/harness/, the script's own directory


def main():
    args = harness_args.parse_args()

    from megatron_let.objectives.hook import find_layer
    from megatron_let.platform import distributed as parallel
    from megatron_let.run_config import load_run_config as load_config
    from megatron_let.training.trainer import Trainer

    trainer = Trainer(load_config(args.config, args.set))
    layer = find_layer(trainer.model, trainer.objective.target_layer)
    owner = getattr(trainer.objective, "teacher", None) is not None
    teacher_ref = weakref.ref(trainer.objective.teacher.model) if owner else None
    report = {
        "rank": dist.get_rank(),
        "owner": owner,
        "steps": [],
        "hooks_before": len(layer._forward_hooks) if layer is not None else None,
    }
    while trainer.iteration < trainer.cfg.training.train_iters:
        record = trainer.train_step()
        report["steps"].append(
            {key: record[key] for key in ("iteration", "lambda", "alignment_loss", "lm_loss")}
            | {"teacher_present": getattr(trainer.objective, "teacher", None) is not None}
        )
    gc.collect()
    report["hooks_after"] = len(layer._forward_hooks) if layer is not None else None
    report["teacher_memory_freed"] = teacher_ref() is None if owner else None
    Path(args.out, f"rank{dist.get_rank()}.json").write_text(json.dumps(report))
    trainer.close()
    parallel.shutdown()


if __name__ == "__main__":
    sys.exit(main())
