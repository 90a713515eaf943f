"""The target model as megatron trains it: one GPT chunk per virtual pipeline stage, each wrapped
in megatron's DistributedDataParallel, and the DDP hooks megatron's schedules call."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterator, Optional

import torch
from megatron.core import parallel_state
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.transformer.module import Float16Module

from megatron_let.config import LETConfig
from megatron_let.model.gpt import DTYPES, Kernels, build_gpt, recompute_options, transformer_config


def build_model_chunks(
    cfg: LETConfig,
    *,
    precision: str,
    use_te: bool,
    kernels: Kernels,
    on_cpu: bool,
    add_modules: Optional[Callable[[torch.nn.Module], None]] = None,
) -> list:
    """This rank's chunks (one, or one per virtual stage), on its device, in DDP. ``add_modules``
    gives each bare chunk what the objective trains with it (a regressor) before it is wrapped."""
    par = cfg.parallel
    config = transformer_config(
        cfg.model,
        tensor_parallel=par.tensor_model_parallel_size,
        pipeline_parallel=par.pipeline_model_parallel_size,
        virtual_pipeline_parallel=par.virtual_pipeline_model_parallel_size,
        sequence_parallel=par.sequence_parallel,
        params_dtype=DTYPES[precision],
        on_cpu=on_cpu,
        kernels=kernels,
        recompute=recompute_options(par),
    )
    vpp = par.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp) if vpp else [None]:
        chunk = build_gpt(
            cfg.model,
            config,
            use_te=use_te,
            tensor_parallel=par.tensor_model_parallel_size,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
            vp_stage=vp_stage,
        )
        if add_modules is not None:
            add_modules(chunk)
        if not on_cpu:
            chunk.cuda(torch.cuda.current_device())
        if precision in ("bf16", "fp16"):
            chunk = Float16Module(config, chunk)
        chunks.append(chunk)
    on_gpu = not on_cpu
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=on_gpu if par.overlap_grad_reduce is None else par.overlap_grad_reduce,
        overlap_param_gather=(on_gpu and par.use_distributed_optimizer)
        if par.overlap_param_gather is None
        else par.overlap_param_gather,
        use_distributed_optimizer=par.use_distributed_optimizer,
        check_for_nan_in_grad=par.check_for_nan_in_loss_and_grad,
        bucket_size=par.ddp_bucket_size,
    )
    # As Megatron-LM: only the first chunk's gradients are bucketed (interleaved schedules).
    return [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0) for i, chunk in enumerate(chunks)
    ]


def wire_gradient_sync(model: list) -> None:
    """Hand megatron's schedule the DDP hooks, as Megatron-LM does: no_sync during all but the
    last microbatch, and with overlap the per-chunk grad / param sync starters."""

    def per_chunk(functions):
        return functions[0] if len(functions) == 1 else functions

    config, ddp = model[0].config, model[0].ddp_config
    config.no_sync_func = per_chunk([chunk.no_sync for chunk in model])
    if ddp.overlap_grad_reduce:
        config.grad_sync_func = per_chunk([chunk.start_grad_sync for chunk in model])
    if ddp.overlap_param_gather:
        config.param_sync_func = per_chunk([chunk.start_param_sync for chunk in model])
    config.finalize_model_grads_func = finalize_model_grads


@contextmanager
def params_synced(model: list) -> Iterator[None]:
    """With the distributed optimizer's overlapped param gather, parameters are gathered by
    forward pre-hooks of the *next* step: evaluation and saving must see them gathered now
    (Megatron-LM's disable/enable_forward_pre_hook around both)."""
    hooked = model[0].ddp_config.overlap_param_gather
    if hooked:
        for chunk in model:
            chunk.disable_forward_pre_hook()  # also finishes the pending gather
    try:
        yield
    finally:
        if hooked:
            for chunk in model:
                chunk.enable_forward_pre_hook()
