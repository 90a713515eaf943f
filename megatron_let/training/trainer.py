"""The trainer (entry point: ``megatron_let.train``, ``megatron-let train``).

Read top to bottom: :meth:`Trainer.__init__` builds everything (process groups, target model
chunks, megatron DDP, optimizer, scheduler, data, teacher + hook on the stage that owns layer k,
checkpoint resume); :meth:`Trainer.train` is the loop; :meth:`Trainer.train_step` is one step of
megatron's ``forward_backward_func`` (1F1B with PP) + optimizer step.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import time
import warnings
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.timers import Timer
from megatron.core.transformer.module import Float16Module

from megatron_let.alignment import alignment_weight
from megatron_let.config import LETConfig, check_same_architecture, resolve_layers, to_dict
from megatron_let.data.datasets import build_datasets, make_iterator
from megatron_let.flops import (
    FlopsCounter,
    megatron_lm_flops_per_token,
    teacher_flops_per_token,
    training_flops_per_token,
)
from megatron_let.model.gpt import (
    build_gpt,
    recompute_options,
    select_kernels,
    transformer_config,
    use_transformer_engine,
)
from megatron_let.objectives.hook import AlignmentHook, find_layer, layer_owner, main_loss_scale
from megatron_let.objectives.teacher import Teacher
from megatron_let.platform import cluster, signals
from megatron_let.platform import distributed as parallel
from megatron_let.platform.files import write_text_atomic
from megatron_let.training import checkpoint

logger = logging.getLogger("megatron_let")

_LAUNCHER_VARIABLES = {
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "GROUP_WORLD_SIZE",
    "ROLE_RANK",
    "ROLE_WORLD_SIZE",
    "ROLE_NAME",
    "MASTER_ADDR",
    "MASTER_PORT",
}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(cfg: LETConfig) -> str:
    if cfg.training.precision != "auto":
        return cfg.training.precision
    return "fp32" if cfg.device == "cpu" else "bf16"


def _record_key(record: dict) -> tuple:
    return record.get("split", "train"), record.get("iteration", 0)


def _truncate_jsonl(path: Path, last_iteration: int) -> set:
    """Keep the records of iterations <= ``last_iteration`` (atomically; a torn last line from a
    killed writer is dropped too). Returns the (split, iteration) keys kept."""
    if not path.exists():
        return set()
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("iteration", 0) <= last_iteration:
            kept.append(record)
    write_text_atomic(path, "".join(json.dumps(record) + "\n" for record in kept))
    return {_record_key(record) for record in kept}


class MetricsLogger:
    """stdout + JSONL + TensorBoard, on global rank 0 (metrics are all-reduced beforehand)."""

    def __init__(self, cfg: LETConfig, start_iteration: int):
        """``start_iteration``: where this launch resumes. Records written by an earlier launch
        after that point (the steps between its last save and its interruption) are dropped, so
        every iteration appears once however often the run restarts."""
        self.active = dist.get_rank() == 0
        self.jsonl = None
        self.tensorboard = None
        self.recorded: set = set()  # kept from earlier launches (e.g. the final evaluation)
        if not self.active:
            return
        path = cfg.logging.jsonl_path
        if path is None and cfg.checkpoint.save:
            path = str(Path(cfg.checkpoint.save) / "metrics.jsonl")
        if path:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self.recorded = _truncate_jsonl(Path(path), start_iteration)
            self.jsonl = open(path, "a")
        if cfg.logging.tensorboard_dir:
            from torch.utils.tensorboard import SummaryWriter

            # TensorBoard hides events of an earlier launch from purge_step on.
            self.tensorboard = SummaryWriter(cfg.logging.tensorboard_dir, purge_step=start_iteration + 1)

    def log(self, record: dict, console: Optional[str] = None) -> None:
        if not self.active:
            return
        if console:
            print(console, flush=True)
        if _record_key(record) in self.recorded:
            return
        if self.jsonl:
            self.jsonl.write(json.dumps(record) + "\n")
            self.jsonl.flush()
        if self.tensorboard:
            step = record.get("iteration", 0)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "iteration" and value is not None:
                    self.tensorboard.add_scalar(f"{record.get('split', 'train')}/{key}", value, step)
            self.tensorboard.flush()

    def close(self) -> None:
        if self.jsonl:
            self.jsonl.close()
        if self.tensorboard:
            self.tensorboard.close()


class Trainer:
    def __init__(self, cfg: LETConfig):
        self.cfg = cfg
        self.on_cpu = cfg.device == "cpu"
        # Before any process group: a missing Transformer Engine is reported at once, by every rank.
        self.use_te = use_transformer_engine(cfg.training.transformer_impl, self.on_cpu)
        self.kernels = select_kernels(cfg.training, cfg.model, self.use_te)
        parallel.init_distributed(cfg)
        self.device = torch.device("cpu") if self.on_cpu else torch.device("cuda", torch.cuda.current_device())
        self.precision = resolve_precision(cfg)
        if self.on_cpu and self.precision != "fp32":
            raise ValueError(f"training.precision={self.precision}: the CPU mode trains in fp32")
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        train = cfg.training
        if train.global_batch_size % (train.micro_batch_size * self.dp_size):
            raise ValueError(
                f"training.global_batch_size={train.global_batch_size} is not divisible by "
                f"micro_batch_size × data-parallel size = {train.micro_batch_size} × {self.dp_size}"
            )
        self.num_microbatches = train.global_batch_size // (train.micro_batch_size * self.dp_size)
        self.iteration = 0
        self.consumed_samples = 0
        self.exit_signal: Optional[str] = None  # the signal that asked this run to stop (any rank's)
        self.started = time.monotonic()
        self._saved_iteration: Optional[int] = None
        self.async_saves = AsyncCallsQueue() if cfg.checkpoint.async_save else None  # megatron's --async-save
        self._pending_saves: list = []  # checkpoints being written in the background, oldest first
        self._install_signal_handler()
        self.lock = self._lock_checkpoint_directory()
        try:
            self._build(cfg)
        except BaseException:
            if self.lock is not None:
                self.lock.release()  # a run that never started holds nothing
            raise

    def _build(self, cfg: LETConfig) -> None:
        """Everything, in build order: target chunks, DDP, optimizer, resume, teacher + hook on the
        stage owning layer k, FLOPs accounting, data, logging."""
        self.model = self._build_model()
        self.config = self.model[0].config
        self.optimizer, self.scheduler = self._build_optimizer()
        self.config.grad_scale_func = self.optimizer.scale_loss
        self._wire_gradient_sync()
        self._align_scheduler()
        self._resume()

        self.target_layer, self.teacher_layer = resolve_layers(cfg)
        self.teacher: Optional[Teacher] = None
        self.hook: Optional[AlignmentHook] = None
        self.hook_chunk = None
        self.owner_stage: Optional[tuple[int, Optional[int]]] = None
        self.teacher_present = cfg.alignment_active and self.iteration < cfg.alignment.stop_step
        if self.teacher_present:
            self._build_teacher()

        self.flops = self._flops_counter()
        self.datasets = build_datasets(cfg, self._dataset_sizes())
        self.train_data = self._iterators(self.datasets[0], self.consumed_samples)
        self.metrics = MetricsLogger(cfg, self.iteration)
        self.interval_timer = Timer("interval-time")  # device-synchronised wall time of training steps
        self.interval_timer.start()
        self._log_setup()

    # ----------------------------------------------------------------------------- building

    def _build_model(self) -> list:
        cfg = self.cfg
        par = cfg.parallel
        config = transformer_config(
            cfg.model,
            tensor_parallel=par.tensor_model_parallel_size,
            pipeline_parallel=par.pipeline_model_parallel_size,
            virtual_pipeline_parallel=par.virtual_pipeline_model_parallel_size,
            sequence_parallel=par.sequence_parallel,
            params_dtype=_DTYPES[self.precision],
            on_cpu=self.on_cpu,
            kernels=self.kernels,
            recompute=recompute_options(par),
        )
        vpp = par.virtual_pipeline_model_parallel_size
        chunks = []
        for vp_stage in range(vpp) if vpp else [None]:
            chunk = build_gpt(
                cfg.model,
                config,
                use_te=self.use_te,
                tensor_parallel=par.tensor_model_parallel_size,
                pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
                post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
                vp_stage=vp_stage,
            )
            if not self.on_cpu:
                chunk.cuda(torch.cuda.current_device())
            if self.precision in ("bf16", "fp16"):
                chunk = Float16Module(config, chunk)
            chunks.append(chunk)
        on_gpu = not self.on_cpu
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
            DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
            for i, chunk in enumerate(chunks)
        ]

    def _wire_gradient_sync(self) -> None:
        """Hand megatron's schedule the DDP hooks, as Megatron-LM does: no_sync during all but the
        last microbatch, and with overlap the per-chunk grad / param sync starters."""

        def per_chunk(functions):
            return functions[0] if len(functions) == 1 else functions

        ddp = self.model[0].ddp_config
        self.config.no_sync_func = per_chunk([chunk.no_sync for chunk in self.model])
        if ddp.overlap_grad_reduce:
            self.config.grad_sync_func = per_chunk([chunk.start_grad_sync for chunk in self.model])
        if ddp.overlap_param_gather:
            self.config.param_sync_func = per_chunk([chunk.start_param_sync for chunk in self.model])
        self.config.finalize_model_grads_func = finalize_model_grads

    @contextmanager
    def _params_synced(self):
        """With the distributed optimizer's overlapped param gather, parameters are gathered by
        forward pre-hooks of the *next* step: evaluation and saving must see them gathered now
        (Megatron-LM's disable/enable_forward_pre_hook around both)."""
        hooked = self.model[0].ddp_config.overlap_param_gather
        if hooked:
            for chunk in self.model:
                chunk.disable_forward_pre_hook()  # also finishes the pending gather
        try:
            yield
        finally:
            if hooked:
                for chunk in self.model:
                    chunk.enable_forward_pre_hook()

    def _build_optimizer(self):
        opt, train = self.cfg.optimizer, self.cfg.training
        config = MegatronOptimizerConfig(
            optimizer="adam",
            lr=opt.lr,
            min_lr=opt.min_lr if opt.min_lr is not None else 0.1 * opt.lr,
            weight_decay=opt.weight_decay,
            adam_beta1=opt.adam_beta1,
            adam_beta2=opt.adam_beta2,
            adam_eps=opt.adam_eps,
            clip_grad=opt.clip_grad,
            bf16=self.precision == "bf16",
            fp16=self.precision == "fp16",
            params_dtype=_DTYPES[self.precision],
            use_distributed_optimizer=self.cfg.parallel.use_distributed_optimizer,
        )
        optimizer = get_megatron_optimizer(config, self.model, use_gloo_process_groups=self.on_cpu)
        decay_steps = max(1, train.train_iters)
        warmup = min(int(round(opt.lr_warmup_fraction * train.train_iters)), decay_steps - 1)
        scheduler = OptimizerParamScheduler(
            optimizer,
            init_lr=0.0,
            max_lr=opt.lr,
            min_lr=config.min_lr,
            lr_warmup_steps=warmup,
            lr_decay_steps=decay_steps,
            lr_decay_style=opt.lr_decay_style,
            start_wd=opt.weight_decay,
            end_wd=opt.weight_decay,
            wd_incr_steps=decay_steps,
            wd_incr_style="constant",
        )
        return optimizer, scheduler

    def _align_scheduler(self) -> None:
        """The scheduler always stands at the iteration about to run (1-based): iteration i trains
        at schedule(i), so the first warm-up step is not spent at lr 0 (megatron's scheduler
        starts at schedule(0) = init_lr), and the lr logged for an iteration is the one it used."""
        self.scheduler.step(increment=self.iteration + 1 - self.scheduler.num_steps)

    def _resume(self) -> None:
        ck = self.cfg.checkpoint
        if not ck.load:
            return
        try:
            directory = checkpoint.resolve_checkpoint(ck.load)
        except FileNotFoundError:  # nothing there yet (an incomplete checkpoint is a CheckpointError)
            if ck.save and Path(ck.load).resolve() == Path(ck.save).resolve():
                self._print(f"no checkpoint in {ck.load} yet: starting from scratch")
                return
            raise checkpoint.CheckpointError(f"checkpoint.load: {ck.load} holds no megatron-let checkpoint") from None
        except checkpoint.CheckpointError as err:
            raise checkpoint.CheckpointError(f"checkpoint.load: {err}") from None
        # The same model, or refuse: a different vocabulary (say) may even fit the padded shapes.
        saved = (checkpoint.read_common_state(directory).get("config") or {}).get("model") or {}
        check_same_architecture(
            self.cfg.model,
            saved,
            f"the checkpoint {directory} (checkpoint.load)",
            getattr(self.cfg, "where", lambda key: "config"),
            prefix="model",
        )
        try:
            common = checkpoint.load_checkpoint(directory, self.model, self.optimizer, self.scheduler)
        except checkpoint.CheckpointError as err:
            raise checkpoint.CheckpointError(f"checkpoint.load: {err}") from None
        self.iteration = int(common["iteration"])
        self.consumed_samples = int(common["consumed_samples"])
        self._align_scheduler()
        if ck.save and Path(ck.save).resolve() == directory.parent.resolve():
            self._saved_iteration = self.iteration  # already on disk: never written again
        self._print(f"loaded checkpoint {directory} at iteration {self.iteration}")

    def _convert_hf_teacher(self) -> None:
        """teacher.hf_path → a megatron-let checkpoint, once: the first rank converts it in a
        subprocess (conversion runs in the CPU mode), the others wait; then teacher.load points at it."""
        teacher = self.cfg.teacher
        if teacher.hf_path is None:
            return
        from megatron_let.objectives.teacher import teacher_layout
        from megatron_let.platform.resources import cache_dir

        tp = teacher_layout(teacher, parallel_state.get_tensor_model_parallel_world_size()).tensor_parallel
        if teacher.load is None:
            key = hashlib.sha1(f"{teacher.hf_path}|{teacher.gguf_file}|tp{tp}".encode()).hexdigest()[:16]
            teacher.load = str(cache_dir() / "teachers" / key)
        if dist.get_rank() == 0 and not checkpoint.has_checkpoint(teacher.load):
            from megatron_let.platform.resources import resolve_model_path

            command = [
                sys.executable,
                "-m",
                "megatron_let.convert",
                "import",
                "--hf-path",
                str(resolve_model_path(teacher.hf_path)),
                "--output",
                teacher.load,
                "--tensor-model-parallel-size",
                str(tp),
            ]
            if teacher.gguf_file:
                command += ["--gguf-file", teacher.gguf_file]
            self._print(f"converting the teacher {teacher.hf_path} into {teacher.load}")
            # A world of its own: none of torchrun's / Slurm's rendezvous variables.
            env = {
                key: value
                for key, value in os.environ.items()
                if not key.startswith(("TORCHELASTIC_", "SLURM_")) and key not in _LAUNCHER_VARIABLES
            }
            result = subprocess.run(command, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"teacher.hf_path: converting {teacher.hf_path} failed:\n{result.stderr[-3000:]}")
        dist.barrier()

    def _build_teacher(self) -> None:
        """Teacher + hook on the stage owning layer k; weights loaded collectively by all ranks."""
        self._convert_hf_teacher()
        owner_pp, owner_vp = layer_owner(self.config, self.target_layer)
        owns = parallel_state.get_pipeline_model_parallel_rank() == owner_pp
        if owns:
            self.teacher = Teacher(
                self.cfg.teacher,
                teacher_layer=self.teacher_layer,
                on_cpu=self.on_cpu,
                use_te=self.use_te,
                seed=self.cfg.training.seed + 1,
                kernels=self.kernels,
            )
            layer = find_layer(self.model, self.target_layer)
            assert layer is not None, f"layer {self.target_layer} should be on pipeline rank {owner_pp}"
            self.hook_chunk = self.model[owner_vp or 0]
            self.hook = AlignmentHook(
                layer,
                loss=self.cfg.alignment.loss,
                logsum_exponent=self.cfg.alignment.logsum_exponent,
                sequence_parallel=self.cfg.parallel.sequence_parallel,
            )
        if self.cfg.teacher.load:
            checkpoint.load_model_weights(self.cfg.teacher.load, self.teacher.model if owns else None)
        self.owner_stage = (owner_pp, owner_vp)

    def _release_teacher(self) -> None:
        self.teacher_present = False
        if self.hook is not None:
            self.hook.remove()
            self.teacher.release()
        self.hook = self.teacher = self.hook_chunk = None
        if not self.on_cpu:
            torch.cuda.reset_peak_memory_stats()  # from here on the peak is the baseline's
        # Iteration i (1-based, as in the log) runs at step s = i - 1 of Eq. 5.
        self._print(
            f"iteration {self.iteration + 1}: λ = 0 from here on (S_stop="
            f"{self.cfg.alignment.stop_step}); teacher released"
        )

    def _flops_counter(self) -> FlopsCounter:
        """Compute spent so far (target training + teacher forwards until S_stop), restored on resume."""
        cfg, seq = self.cfg, self.cfg.training.seq_length
        tp = cfg.parallel.tensor_model_parallel_size
        counter = FlopsCounter(
            training_flops_per_token(cfg.model, seq),
            target_throughput_per_token=megatron_lm_flops_per_token(cfg.model, seq, tp),
        )
        teacher_steps = 0
        if cfg.alignment_active:
            counter.teacher_per_token = teacher_flops_per_token(cfg.teacher.model, seq, self.teacher_layer)
            counter.teacher_throughput_per_token = megatron_lm_flops_per_token(
                cfg.teacher.model, seq, forward_only=True, layers=self.teacher_layer, logits=False
            )
            teacher_steps = min(self.iteration, cfg.alignment.stop_step)
        tokens = cfg.training.global_batch_size * seq
        counter.total = tokens * (self.iteration * counter.target_per_token + teacher_steps * counter.teacher_per_token)
        return counter

    def _dataset_sizes(self) -> tuple[int, int, int]:
        gbs, ev = self.cfg.training.global_batch_size, self.cfg.eval
        train = self.cfg.training.train_iters * gbs
        valid = ev.eval_iters * gbs if ev.eval_interval else 0
        test = ev.eval_iters * gbs if ev.test_at_end else 0
        return train, valid, test

    def _iterators(self, dataset, consumed: int):
        if dataset is None:
            return None
        workers = self.cfg.data.num_workers
        make = partial(
            make_iterator,
            dataset,
            consumed,
            self.cfg.training.micro_batch_size,
            self.dp_rank,
            self.dp_size,
            self.device,
            num_workers=(0 if self.on_cpu else 2) if workers is None else workers,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            vocab_size=self.cfg.model.vocab_size,
        )
        # Interleaved schedules pull from one iterator per model chunk, in lockstep.
        return [make() for _ in self.model] if len(self.model) > 1 else make()

    # ----------------------------------------------------------------------------- the step

    def _forward_step(self, data_iterator, model, alignment_weight_now: float = 0.0):
        batch = next(data_iterator)
        tokens, position_ids = batch["tokens"], batch["position_ids"]
        attention_mask = batch.get("attention_mask")
        if self.hook is not None and model is self.hook_chunk and alignment_weight_now > 0:
            teacher_hidden = self.teacher.hidden_states(tokens, position_ids, attention_mask)
            scale = main_loss_scale(self.config, self.num_microbatches, self.device)
            self.hook.prepare(teacher_hidden, batch["loss_mask"], alignment_weight_now, scale)
        output = model(tokens, position_ids, attention_mask, labels=batch["labels"])
        return output, partial(self._loss, batch["loss_mask"])

    @staticmethod
    def _loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
        mask = loss_mask.reshape(-1).float()
        loss_sum = (per_token_loss.float().reshape(-1) * mask).sum()
        tokens = mask.sum()
        report = torch.stack([loss_sum.detach(), tokens])
        return loss_sum, tokens.to(torch.int), {"lm loss": report}

    def train_step(self) -> dict:
        """One optimizer step over global_batch_size samples, its metrics read at once."""
        return self._read_metrics([self._step()])[0]

    def _step(self) -> dict:
        """One optimizer step. Its metrics stay on the device (``_read_metrics`` reads a whole log
        interval's at once: no host synchronisation of ours per step or microbatch)."""
        cfg = self.cfg
        weight = (
            alignment_weight(self.iteration, cfg.alignment.lambda0, cfg.alignment.stop_step)
            if cfg.alignment_active
            else 0.0
        )
        if self.teacher_present and weight == 0.0:
            self._release_teacher()

        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, alignment_weight_now=weight),
            data_iterator=self.train_data,
            model=self.model,
            num_microbatches=self.num_microbatches,
            seq_length=cfg.training.seq_length,
            micro_batch_size=cfg.training.micro_batch_size,
            forward_only=False,
        )
        lr = self.optimizer.param_groups[0]["lr"]  # what this iteration trains at
        success, grad_norm, _ = self.optimizer.step()
        if success:
            self.scheduler.step(increment=1)
        self.iteration += 1
        self.consumed_samples += cfg.training.global_batch_size
        tokens = cfg.training.global_batch_size * cfg.training.seq_length
        self.flops.step(tokens, teacher_active=weight > 0)
        return {
            "iteration": self.iteration,
            "sums": self._local_metric_sums(outputs, self.hook.take_metrics() if self.hook else None),
            "lambda": weight,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "skipped": not success,
            "throughput_flops": tokens * self.flops.throughput_per_token(teacher_active=weight > 0),
            "flops_total": self.flops.total,
            "consumed_samples": self.consumed_samples,
        }

    def _step_listing_host_syncs(self) -> dict:
        """One step under CUDA's sync debug mode: every operation that makes the host wait for the
        device is reported (where it was called from), once per call site."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step = self._step()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        sites = sorted({f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)})
        step["host_syncs"] = len(sites)
        self._print(
            f"iteration {step['iteration']} under CUDA sync debug mode: {len(sites)} call sites "
            "synchronise with the device" + "".join(f"\n  {site}" for site in sites)
        )
        return step

    def _local_metric_sums(self, lm_outputs: list, align) -> torch.Tensor:
        """This rank's share of (Σ LM loss, LM tokens, Σ alignment loss, Σ cos, alignment tokens), on
        the device; summed over ranks, they give the global token-weighted means."""
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        values = torch.zeros(5, dtype=torch.float64, device=self.device)
        if lm_outputs and parallel_state.is_pipeline_last_stage(ignore_virtual=True) and tp_rank == 0:
            values[:2] = torch.stack([item["lm loss"] for item in lm_outputs]).to(torch.float64).sum(0)
        # TP ranks hold identical alignment values unless the sequence is sharded across them.
        if align is not None and align.sums is not None and (self.cfg.parallel.sequence_parallel or tp_rank == 0):
            values[2:] = align.sums
        return values

    def _read_metrics(self, steps: list[dict]) -> list[dict]:
        """Finish the records of a log interval: one all-reduce and one host read for all its steps.

        ``step_time_s`` is the interval's wall time (megatron's timer: device synchronised, ranks
        barriered; evaluation and saving excluded) over its steps — Megatron-LM's "elapsed time per
        iteration"; at ``logging.log_interval: 1`` it is each step's own. Peak memory is the
        interval's (reset after each read and when the teacher is released), max over ranks."""
        step_time = self.interval_timer.elapsed(reset=True, barrier=True) / len(steps)
        sums = torch.stack([step.pop("sums") for step in steps])
        dist.all_reduce(sums)
        sums = sums.cpu()
        memory: Optional[list] = None
        if not self.on_cpu:
            peaks = torch.tensor(
                [torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()],
                dtype=torch.float64,
                device=self.device,
            )
            dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
            memory = (peaks / 2**30).tolist()
            torch.cuda.reset_peak_memory_stats()
        tokens = self.cfg.training.global_batch_size * self.cfg.training.seq_length
        records = []
        for step, (lm_sum, lm_tokens, align_sum, cos_sum, align_tokens) in zip(steps, sums.tolist()):
            record = {
                "iteration": step["iteration"],
                "lm_loss": lm_sum / lm_tokens if lm_tokens > 0 else None,
                "alignment_loss": align_sum / align_tokens if align_tokens > 0 else None,
                "cosine_similarity": cos_sum / align_tokens if align_tokens > 0 else None,
                "lambda": step["lambda"],
                "lr": step["lr"],
                "grad_norm": step["grad_norm"],
                "skipped": step["skipped"],
                "step_time_s": step_time,
                "tokens_per_s": tokens / step_time,
                "tflops_per_gpu": step["throughput_flops"] / step_time / dist.get_world_size() / 1e12,
                "flops_total": step["flops_total"],
                "consumed_samples": step["consumed_samples"],
            }
            if memory is not None:
                record["peak_memory_allocated_gib"], record["peak_memory_reserved_gib"] = memory
            if "host_syncs" in step:
                record["host_syncs"] = step["host_syncs"]
            records.append(record)
        return records

    def evaluate(self, split: str) -> Optional[dict]:
        """Mean LM loss and perplexity over eval_iters global batches of the valid/test split."""
        with self._params_synced(), self._outside_step_time():
            return self._evaluate(split)

    @torch.no_grad()
    def _evaluate(self, split: str) -> Optional[dict]:
        dataset = self.datasets[1 if split == "valid" else 2]
        if dataset is None:
            return None
        data = self._iterators(dataset, 0)
        for chunk in self.model:
            chunk.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # read once, at the end
        for _ in range(self.cfg.eval.eval_iters):
            outputs = get_forward_backward_func()(
                forward_step_func=self._forward_step,
                data_iterator=data,
                model=self.model,
                num_microbatches=self.num_microbatches,
                seq_length=self.cfg.training.seq_length,
                micro_batch_size=self.cfg.training.micro_batch_size,
                forward_only=True,
            )
            if (
                outputs
                and parallel_state.is_pipeline_last_stage(ignore_virtual=True)
                and parallel_state.get_tensor_model_parallel_rank() == 0
            ):
                totals += torch.stack([item["lm loss"] for item in outputs]).to(torch.float64).sum(0)
        for chunk in self.model:
            chunk.train()
        dist.all_reduce(totals)
        loss = float(totals[0] / totals[1])
        return {"iteration": self.iteration, "split": split, "lm_loss": loss, "perplexity": math.exp(min(loss, 700.0))}

    # ----------------------------------------------------------------------------- the loop

    def train(self) -> int:
        cfg = self.cfg
        if self._should_exit():  # a signal during start-up: nothing trained, nothing to save
            return self._stop("interrupted", f"{self.exit_signal} received during start-up: exiting")
        self.interval_timer.reset()
        self.interval_timer.start(barrier=True)
        interval: list[dict] = []  # this log interval's steps, metrics still on the device
        while self.iteration < cfg.training.train_iters:
            if cfg.logging.sync_debug_iteration == self.iteration + 1 and not self.on_cpu:
                interval.append(self._step_listing_host_syncs())
            else:
                interval.append(self._step())
            if self._pending_saves:
                self._finalize_saves(blocking=False)
            last = self.iteration >= cfg.training.train_iters
            if self.iteration % cfg.logging.log_interval == 0 or last:
                self._log_interval(interval)
                interval = []
            if cfg.eval.eval_interval and self.iteration % cfg.eval.eval_interval == 0:
                self._log_eval(self.evaluate("valid"))
            if self._should_exit():
                self._log_interval(interval)
                self.save()
                return self._stop(
                    "interrupted",
                    f"{self.exit_signal or 'signal'} received: saved at iteration {self.iteration}, exiting",
                )
            if last:
                break
            if cfg.training.exit_interval and self.iteration % cfg.training.exit_interval == 0:
                self._log_interval(interval)
                self.save()
                return self._stop(
                    "exit_interval", f"exit interval reached: saved at iteration {self.iteration}, exiting"
                )
            if self._duration_exceeded():
                self._log_interval(interval)
                self.save()
                return self._stop(
                    "interrupted", f"exit_duration_in_mins reached: saved at iteration {self.iteration}, exiting"
                )
            if cfg.checkpoint.save_interval and self.iteration % cfg.checkpoint.save_interval == 0:
                self.save()
        if cfg.eval.eval_interval and self.iteration % cfg.eval.eval_interval != 0:
            self._log_eval(self.evaluate("valid"))
        if cfg.eval.test_at_end:
            self._log_eval(self.evaluate("test"))
        self.save()
        return self._stop("finished", f"training finished at iteration {self.iteration}")

    def _log_interval(self, steps: list[dict]) -> None:
        if not steps:
            return
        records = self._read_metrics(steps)
        for record in records:
            self.metrics.log(record)
        self._print(self._format(records[-1], records))

    @contextmanager
    def _outside_step_time(self):
        """Evaluation and saving do not count as training time (Megatron-LM stops its interval
        timer around both)."""
        self.interval_timer.stop()
        try:
            yield
        finally:
            self.interval_timer.start()

    def save(self) -> None:
        if not self.cfg.checkpoint.save or self._saved_iteration == self.iteration:
            return
        ck = self.cfg.checkpoint
        with self._params_synced(), self._outside_step_time():
            self._finalize_saves(blocking=True)  # at most one background save in flight
            path = checkpoint.save_checkpoint(
                ck.save,
                self.iteration,
                self.model,
                self.optimizer,
                self.scheduler,
                self.consumed_samples,
                to_dict(self.cfg),
                keep_last=ck.keep_last,
                fully_parallel=ck.fully_parallel_save,
                async_queue=self.async_saves,
            )
        self._saved_iteration = self.iteration
        if self.async_saves is None:
            self._print(f"saved checkpoint {path}")
        else:
            self._pending_saves.append(path)
            self._print(f"writing checkpoint {path} in the background")

    def _finalize_saves(self, blocking: bool) -> None:
        """Background saves that have finished appear now (renamed, tracked); ``blocking`` waits."""
        for _ in checkpoint.finalize_async_saves(self.async_saves, blocking=blocking):
            self._print(f"saved checkpoint {self._pending_saves.pop(0)}")

    def _stop(self, status: str, message: str) -> int:
        """Report how the run ended. ``MEGATRON_LET_EXIT_STATE`` (set by the sbatch scripts) names
        a file that gets the status, which tells the script whether to requeue the job:
        ``interrupted`` (a signal or the duration limit, before train_iters) → requeue;
        ``finished`` / ``exit_interval`` → done."""
        self._finalize_saves(blocking=True)  # the checkpoint exists before the run reports
        self._print(message)
        path = os.environ.get("MEGATRON_LET_EXIT_STATE")
        if path and dist.get_rank() == 0:
            state = {
                "status": status,
                "iteration": self.iteration,
                "train_iters": self.cfg.training.train_iters,
                "signal": self.exit_signal,
                "checkpoint": self.cfg.checkpoint.save,
            }
            write_text_atomic(path, json.dumps(state) + "\n")
        return 0

    def close(self) -> None:
        self.metrics.close()
        if self.lock is not None:
            self.lock.release()

    # ----------------------------------------------------------------------------- helpers

    def _install_signal_handler(self) -> None:
        """Slurm signals every process of a job step (preemption, time limit, requeue, scancel):
        note it and stop at the end of the current step, after a save."""
        signals.listen(self.cfg.training.exit_signals if self.cfg.training.exit_signal_handler else ())

    def _should_exit(self) -> bool:
        """Collective: every rank stops if any rank was signalled (Slurm may deliver to some first)."""
        flag = torch.tensor([1.0 if signals.received() else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() > 0 and self.exit_signal is None:
            self.exit_signal = signals.received() or "a signal (to another rank)"
        return bool(flag.item() > 0)

    def _duration_exceeded(self) -> bool:
        """Megatron-LM's --exit-duration-in-mins, decided by rank 0's clock for all ranks."""
        limit = self.cfg.training.exit_duration_in_mins
        if limit is None:
            return False
        flag = torch.tensor([float(time.monotonic() - self.started > limit * 60)], device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item() > 0)

    def _lock_checkpoint_directory(self) -> Optional[cluster.RunLock]:
        """Rank 0 takes ``checkpoint.save``'s lock (and clears what killed saves left there);
        every rank learns the outcome, so a refused lock stops all of them at once."""
        save = self.cfg.checkpoint.save
        if not save:
            return None
        lock, error = None, None
        if dist.get_rank() == 0:
            try:
                lock = cluster.RunLock(save)
                lock.acquire()
                for stale in checkpoint.remove_stale(save):
                    self._print(f"removed {stale} (left by an interrupted save)")
            except cluster.LockHeld as err:
                error = str(err)
        outcome = [error]
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0]:
            raise cluster.LockHeld(f"checkpoint.save: {outcome[0]}")
        return lock

    def _log_eval(self, record: Optional[dict]) -> None:
        if record is None:
            return
        self.metrics.log(
            record,
            f" {record['split']} | iteration {record['iteration']} | "
            f"lm loss {record['lm_loss']:.4f} | perplexity {record['perplexity']:.2f}",
        )

    def _format(self, record: dict, window: list[dict]) -> str:
        def mean(key: str) -> float:
            values = [r[key] for r in window if r[key] is not None]
            return sum(values) / max(1, len(values))

        parts = [
            f" iteration {record['iteration']:>6}/{self.cfg.training.train_iters}",
            f"lm loss {mean('lm_loss'):.4f}",
        ]
        if record["lambda"] > 0 or record["alignment_loss"] is not None:
            parts += [
                f"alignment loss {record['alignment_loss']:.4f}"
                if record["alignment_loss"] is not None
                else "alignment loss -",
                f"cos sim {record['cosine_similarity']:.4f}"
                if record["cosine_similarity"] is not None
                else "cos sim -",
                f"λ {record['lambda']:.4g}",
            ]
        parts += [
            f"lr {record['lr']:.3e}",
            f"grad norm {record['grad_norm']:.3f}" if record["grad_norm"] is not None else "grad norm -",
            f"elapsed time per iteration (ms) {1000 * record['step_time_s']:.1f}",
            f"tokens/s {mean('tokens_per_s'):.0f}",
            f"TFLOP/s/{'rank' if self.on_cpu else 'GPU'} {mean('tflops_per_gpu'):.3g}",
        ]
        if "peak_memory_allocated_gib" in record:
            parts.append(
                f"peak mem allocated/reserved {record['peak_memory_allocated_gib']:.2f}/"
                f"{record['peak_memory_reserved_gib']:.2f} GiB"
            )
        return " | ".join(parts)

    def _log_setup(self) -> None:
        cfg = self.cfg
        par = cfg.parallel
        info = parallel.world_info()
        lines = [
            f"megatron-let: world {info['world_size']} = TP {par.tensor_model_parallel_size} × "
            f"PP {par.pipeline_model_parallel_size} × DP {self.dp_size}"
            + (" (sequence parallel)" if par.sequence_parallel else "")
            + f", device {cfg.device}, precision {self.precision}, "
            + ("Transformer Engine layers" if self.use_te else "local layers"),
            f"target: {cfg.model.num_layers} layers × {cfg.model.hidden_size}, "
            f"{self.num_microbatches} microbatches of {cfg.training.micro_batch_size} × {cfg.training.seq_length}",
        ]
        if cfg.alignment_active:
            owner = self.owner_stage
            where = (
                f"pipeline stage {owner[0]}" + (f" chunk {owner[1]}" if owner[1] is not None else "")
                if owner
                else "released"
            )
            lines.append(
                f"LET: target layer {self.target_layer} ({where}) ← teacher "
                f"{'final hidden state' if self.teacher_layer is None else f'layer {self.teacher_layer}'} "
                f"({cfg.teacher.model.num_layers} layers × {cfg.teacher.model.hidden_size}), "
                f"{cfg.alignment.loss} loss, λ0 {cfg.alignment.lambda0} → 0 at step {cfg.alignment.stop_step}"
            )
        for line in lines:
            self._print(line)

    @staticmethod
    def _print(message: str) -> None:
        if dist.get_rank() == 0:
            print(message, flush=True)


def run(cfg: LETConfig) -> int:
    trainer = Trainer(cfg)
    try:
        return trainer.train()
    finally:
        signals.ignore_from_now_on()
        trainer.close()
        parallel.shutdown()
