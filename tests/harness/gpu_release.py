"""One process on one GPU: how much device memory releasing the teacher gives back, measured with
torch.cuda.memory_allocated(). Writes <out> (JSON).

1. A Teacher built on its own (as the trainer builds it) and run once; memory before and after
   Teacher.release().
2. The trainer's own teacher after a real LET step; memory before and after Trainer._release_teacher()
   (what the trainer does at S_stop), then one more step, which must run without alignment.

Each figure goes with the teacher's parameter count and dtypes, from the model itself.
"""

import gc
import json
import sys
import weakref
from pathlib import Path

import torch

import harness_args  # tests/harness/, the script's own directory


def allocated() -> int:
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def describe(model) -> dict:
    params = list(model.parameters())
    return {
        "numel": sum(p.numel() for p in params),
        "dtypes": sorted({str(p.dtype) for p in params}),
        "devices": sorted({p.device.type for p in params}),
    }


def main():
    args = harness_args.parse_args()

    from megatron_let.objectives.teacher import Teacher
    from megatron_let.platform import distributed as parallel
    from megatron_let.run_config import load_run_config as load_config
    from megatron_let.training.trainer import Trainer

    cfg = load_config(args.config, args.set)
    trainer = Trainer(cfg)
    assert getattr(trainer.objective, "teacher", None) is not None, "the config must give the trainer a teacher"
    report = {}

    # 1. Teacher.release() on a teacher of its own.
    before_build = allocated()
    teacher = Teacher(
        cfg.teacher,
        teacher_layer=trainer.objective.teacher_layer,
        on_cpu=False,
        use_te=trainer.use_te,
        seed=cfg.training.seed + 1,
        kernels=trainer.kernels,
    )
    seq, batch = cfg.training.seq_length, cfg.training.micro_batch_size
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, seq), device=trainer.device)
    positions = torch.arange(seq, device=trainer.device).unsqueeze(0).expand(batch, seq)
    hidden = teacher.hidden_states(tokens, positions, None)
    hidden_shape = list(hidden.shape)
    del hidden
    model_ref = weakref.ref(teacher.model)
    report["standalone"] = {
        **describe(teacher.model),
        "hidden_shape": hidden_shape,
        "before_build": before_build,
        "before_release": allocated(),
    }
    teacher.release()
    report["standalone"].update(
        {
            "after_release": allocated(),
            "model_collected": model_ref() is None,
            "has_model_attribute": hasattr(teacher, "model"),
        }
    )
    del teacher

    # 2. The trainer's teacher, after a real step with alignment.
    first = trainer.train_step()
    model_ref = weakref.ref(trainer.objective.teacher.model)
    report["trainer"] = {
        **describe(trainer.objective.teacher.model),
        "first_step_alignment_loss": first["alignment_loss"],
        "before_release": allocated(),
    }
    trainer.objective.release(trainer.iteration)
    report["trainer"].update(
        {
            "after_release": allocated(),
            "model_collected": model_ref() is None,
            "teacher_is_none": trainer.objective.teacher is None,
            "hook_is_none": trainer.objective.hook is None,
        }
    )
    second = trainer.train_step()
    report["trainer"].update(
        {
            "second_step_alignment_loss": second["alignment_loss"],
            "second_step_lm_loss": second["lm_loss"],
            "after_second_step": allocated(),
        }
    )
    Path(args.out).write_text(json.dumps(report, indent=1))
    trainer.close()
    parallel.shutdown()


if __name__ == "__main__":
    sys.exit(main())
