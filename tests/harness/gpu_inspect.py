"""One process on one GPU: build the real trainer, say which modules and fused kernels it got, take
one step, and say whether the fused weight-gradient path really ran. Writes <out> (JSON).

Run under torchrun with 1 process; tests/test_gpu.py asserts on the report.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import torch.distributed as dist

import harness_args  # tests/harness/, the script's own directory

KERNELS = (
    "bias_activation_fusion",
    "bias_dropout_fusion",
    "apply_rope_fusion",
    "gradient_accumulation_fusion",
    "cross_entropy_loss_fusion",
)
# The TE spec of megatron-core's GPT layer (get_gpt_layer_with_transformer_engine_spec).
LINEARS = ("self_attention.linear_qkv", "self_attention.linear_proj", "mlp.linear_fc1", "mlp.linear_fc2")


def class_name(module) -> str:
    return f"{type(module).__module__}.{type(module).__qualname__}"


def layer_report(gpt) -> dict:
    """Per decoder layer: each submodule's class and whether it is the Transformer Engine one."""
    from megatron.core.extensions.transformer_engine import (
        TEDotProductAttention,
        TELayerNormColumnParallelLinear,
        TERowParallelLinear,
    )

    expected = {
        "self_attention.linear_qkv": TELayerNormColumnParallelLinear,
        "self_attention.core_attention": TEDotProductAttention,
        "self_attention.linear_proj": TERowParallelLinear,
        "mlp.linear_fc1": TELayerNormColumnParallelLinear,
        "mlp.linear_fc2": TERowParallelLinear,
    }
    layers = []
    for layer in gpt.decoder.layers:
        entry = {}
        for path, cls in expected.items():
            module = layer.get_submodule(path)
            entry[path] = {
                "class": class_name(module),
                "is_te": isinstance(module, cls),
                "fuse_wgrad_accumulation": getattr(module, "fuse_wgrad_accumulation", None),
            }
        layers.append(entry)
    final = gpt.decoder.final_layernorm
    return {"layers": layers, "final_layernorm": class_name(final) if final is not None else None}


def main():
    args = harness_args.parse_args()

    from megatron_let.model.gpt import unwrap
    from megatron_let.platform import distributed as parallel
    from megatron_let.run_config import load_run_config as load_config
    from megatron_let.training.trainer import Trainer

    trainer = Trainer(load_config(args.config, args.set))
    gpt = unwrap(trainer.model[0])
    report = {
        "use_te": trainer.use_te,
        "precision": trainer.precision,
        "wrapper": class_name(trainer.model[0].module),  # DDP(Float16Module(GPTModel)) in BF16
        "param_dtypes": sorted({str(p.dtype) for p in gpt.parameters()}),
        "kernels": {name: getattr(trainer.config, name) for name in KERNELS},
        # megatron's own (non-TE) output layer fuses its weight gradient with apex's extension only.
        "apex_wgrad_extension": importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None,
        "target": layer_report(gpt),
        "output_layer": class_name(gpt.output_layer),
    }
    if getattr(trainer.objective, "teacher", None) is not None:
        teacher = trainer.objective.teacher.model
        report["teacher"] = layer_report(teacher)
        report["teacher_kernels"] = {name: getattr(teacher.config, name) for name in KERNELS}
        report["teacher_param_dtypes"] = sorted({str(p.dtype) for p in teacher.parameters()})

    record = trainer.train_step()
    report["step"] = {
        key: record.get(key)
        for key in (
            "lm_loss",
            "alignment_loss",
            "lambda",
            "grad_norm",
            "peak_memory_allocated_gib",
            "peak_memory_reserved_gib",
        )
    }
    report["step"]["finite"] = all(
        math.isfinite(record[k]) for k in ("lm_loss", "grad_norm") if record.get(k) is not None
    )
    # TE's GEMMs (and megatron's ColumnParallelLinear) with fused weight-gradient accumulation write
    # the weight gradient straight into the fp32 main_grad and flag the weight; megatron DDP clears
    # the flag only at the next zero_grad_buffer(). So after a step the flag says which path ran.
    fused = {}
    for index, layer in enumerate(gpt.decoder.layers):
        for path in LINEARS:
            weight = layer.get_submodule(path).weight
            fused[f"decoder.layers.{index}.{path}.weight"] = bool(getattr(weight, "grad_added_to_main_grad", False))
    fused["output_layer.weight"] = bool(getattr(gpt.output_layer.weight, "grad_added_to_main_grad", False))
    report["grad_added_to_main_grad"] = fused
    report["main_grad_nonzero"] = all(float(p.main_grad.abs().max()) > 0 for p in gpt.parameters())
    if dist.get_rank() == 0:
        Path(args.out).write_text(json.dumps(report, indent=1))
    trainer.close()
    parallel.shutdown()


if __name__ == "__main__":
    sys.exit(main())
