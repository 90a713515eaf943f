"""The trainer (entry point: ``megatron_let.train``, ``megatron-let train``).

Read top to bottom: :meth:`Trainer.__init__` builds the run in order (device, process groups,
target model chunks in DDP, optimizer, resume, the objective, data, metrics); :meth:`Trainer.train`
is the loop; :meth:`Trainer._step` is one optimizer step through megatron's ``forward_backward_func``
(1F1B with PP). What the run learns from besides the data is the objective's business
(:mod:`megatron_let.objectives`): the trainer calls it at fixed points and knows no method.
"""

from __future__ import annotations

import warnings
from contextlib import ExitStack
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_let.config import LETConfig
from megatron_let.data.datasets import build_datasets, close_iterators, make_iterator
from megatron_let.flops import FlopsCounter
from megatron_let.model.gpt import resolve_precision, select_kernels, use_transformer_engine
from megatron_let.objectives import (
    add_trainable_modules,
    build_objective,
    cost_schedule,
    phased_schedule,
    trainable_module_keys,
)
from megatron_let.objectives.base import NOT_COMPUTED
from megatron_let.platform import cpu, signals
from megatron_let.platform import distributed as parallel
from megatron_let.training.budget import resolve_budget
from megatron_let.training.checkpointer import Checkpointer, lock_checkpoint_directory
from megatron_let.training.evaluator import Evaluator
from megatron_let.training.metrics import StepMetrics
from megatron_let.training.optimizer import align_scheduler, build_optimizer
from megatron_let.training.parallel_model import build_model_chunks, params_synced, wire_gradient_sync
from megatron_let.training.stopping import StopConditions


class Trainer:
    def __init__(self, cfg: LETConfig):
        self.cfg = cfg
        self.on_cpu = cfg.device == "cpu"
        self.held = ExitStack()  # what close() gives back (or a failed build, at once), last first
        try:
            self._build(cfg)
        except BaseException:
            self.held.close()  # a run that never started holds nothing
            raise

    def _build(self, cfg: LETConfig) -> None:
        # The run's length: training.flops_budget → train_iters for this method (and its phases).
        self.budget_line = resolve_budget(cfg)
        # The device. CPU mode (megatron-core without CUDA) is one scoped switch, left in close().
        if self.on_cpu:
            self.held.enter_context(cpu.cpu_mode())
        # Before any process group: a missing Transformer Engine is reported at once, by every rank.
        self.use_te = use_transformer_engine(cfg.training.transformer_impl, self.on_cpu)
        self.kernels = select_kernels(cfg.training, cfg.model, self.use_te)
        self.precision = resolve_precision(cfg.training.precision, self.on_cpu)
        if self.on_cpu and self.precision != "fp32":
            raise ValueError(f"training.precision={self.precision}: the CPU mode trains in fp32")

        # Process groups (TP × PP × DP) and the batch split.
        parallel.init_distributed(cfg)
        self.device = torch.device("cpu") if self.on_cpu else torch.device("cuda", torch.cuda.current_device())
        self.dp_size = parallel_state.get_data_parallel_world_size()
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.num_microbatches = self._microbatches()
        self.stop = StopConditions(cfg, self.device)
        lock = lock_checkpoint_directory(cfg, self._print)
        if lock is not None:
            self.held.callback(lock.release)

        # The target: model chunks (with what the objective trains alongside) in megatron's DDP,
        # optimizer, scheduler, then its checkpoint.
        self.model = build_model_chunks(
            cfg,
            precision=self.precision,
            use_te=self.use_te,
            kernels=self.kernels,
            on_cpu=self.on_cpu,
            add_modules=partial(add_trainable_modules, cfg),
        )
        self.config = self.model[0].config
        self.optimizer, self.scheduler = build_optimizer(
            cfg, self.model, precision=self.precision, on_cpu=self.on_cpu, phases=phased_schedule(cfg)
        )
        wire_gradient_sync(self.model)
        self.checkpointer = Checkpointer(
            cfg, self.model, self.optimizer, self.scheduler, self._print, trainable_module_keys(cfg)
        )
        self.iteration, self.consumed_samples = self.checkpointer.resume()
        align_scheduler(self.scheduler, self.iteration)

        # What it learns from besides the data (LET: the teacher and the hook on layer k's stage).
        self.objective = build_objective(
            cfg,
            self.model,
            iteration=self.iteration,
            on_cpu=self.on_cpu,
            use_te=self.use_te,
            kernels=self.kernels,
            device=self.device,
            num_microbatches=self.num_microbatches,
            log=self._print,
        )
        self.held.callback(self.objective.close)
        self.flops = self._flops_counter()

        # Data, evaluation, metrics.
        self.datasets = build_datasets(cfg, self._dataset_sizes())
        self.train_data = self._iterators(self.datasets[0], self.consumed_samples)
        if self.train_data is not None:
            self.held.callback(close_iterators, self.train_data)
        self.evaluator = Evaluator(
            cfg,
            self.model,
            self.datasets,
            iterators=self._iterators,
            forward_step=self._forward_step,
            num_microbatches=self.num_microbatches,
            device=self.device,
        )
        self.metrics = StepMetrics(
            cfg,
            start_iteration=self.iteration,
            device=self.device,
            on_cpu=self.on_cpu,
            metric_labels={key: self.objective.metric_labels[key] for key in self.objective.metric_keys},
            weight_label=self.objective.weight_label,
        )
        self.held.callback(self.metrics.close)
        self._log_setup()

    # ----------------------------------------------------------------------------- building

    def _microbatches(self) -> int:
        train = self.cfg.training
        if train.global_batch_size % (train.micro_batch_size * self.dp_size):
            raise ValueError(
                f"training.global_batch_size={train.global_batch_size} is not divisible by "
                f"micro_batch_size × data-parallel size = {train.micro_batch_size} × {self.dp_size}"
            )
        return train.global_batch_size // (train.micro_batch_size * self.dp_size)

    def _flops_counter(self) -> FlopsCounter:
        """The objective's FLOPs step by step (its phases), the total spent restored on resume."""
        train = self.cfg.training
        return FlopsCounter(
            cost_schedule(self.cfg, train.flops_convention),
            cost_schedule(self.cfg, "megatron"),
            train.global_batch_size * train.seq_length,
            self.iteration,
        )

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

    def _forward_step(self, data_iterator, model, objective_weight: float = 0.0, evaluating: bool = True):
        batch = next(data_iterator)
        output, nll = self.objective.forward(model, batch, objective_weight, evaluating=evaluating)
        return output, partial(self._loss, batch["loss_mask"], nll)

    @staticmethod
    def _loss(loss_mask: torch.Tensor, nll, per_token_loss: torch.Tensor):
        """The masked token sum of the loss to minimise (megatron divides by the global token
        count); the LM loss is reported, which is that loss unless the objective adds to it (or
        did not compute one: NOT_COMPUTED)."""
        mask = loss_mask.reshape(-1).float()
        loss_sum = (per_token_loss.float().reshape(-1) * mask).sum()
        tokens = mask.sum()
        if nll is NOT_COMPUTED:
            report = torch.zeros(2, device=tokens.device)
        else:
            lm_sum = loss_sum if nll is None else (nll.float().reshape(-1) * mask).sum()
            report = torch.stack([lm_sum.detach(), tokens])
        return loss_sum, tokens.to(torch.int), {"lm loss": report}

    def train_step(self) -> dict:
        """One optimizer step over global_batch_size samples, its metrics read at once."""
        return self.metrics.read([self._step()])[0]

    def _step(self) -> dict:
        """One optimizer step. Its metrics stay on the device (``StepMetrics.read`` reads a whole
        log interval's at once: no host synchronisation of ours per step or microbatch)."""
        cfg = self.cfg
        weight = self.objective.begin_step(self.iteration)
        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = get_forward_backward_func()(
            forward_step_func=partial(self._forward_step, objective_weight=weight, evaluating=False),
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
        throughput_flops = self.flops.step(self.iteration)
        self.iteration += 1
        self.consumed_samples += cfg.training.global_batch_size
        return {
            "iteration": self.iteration,
            "sums": self.metrics.local_sums(outputs, self.objective.take_metric_sums()),
            "lambda": weight,
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "skipped": not success,
            "throughput_flops": throughput_flops,
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

    def evaluate(self, split: str) -> Optional[dict]:
        """Mean LM loss and perplexity over eval_iters global batches of the valid/test split."""
        with params_synced(self.model), self.metrics.paused():
            return self.evaluator.evaluate(split, self.iteration)

    # ----------------------------------------------------------------------------- the loop

    def train(self) -> int:
        cfg = self.cfg
        if self.stop.signalled():  # a signal during start-up: nothing trained, nothing to save
            return self._stop("interrupted", f"{self.stop.exit_signal} received during start-up: exiting")
        self.metrics.restart_timer()
        interval: list[dict] = []  # this log interval's steps, metrics still on the device
        while self.iteration < cfg.training.train_iters:
            if cfg.logging.sync_debug_iteration == self.iteration + 1 and not self.on_cpu:
                interval.append(self._step_listing_host_syncs())
            else:
                interval.append(self._step())
            self.checkpointer.finish(blocking=False)
            last = self.iteration >= cfg.training.train_iters
            if self.iteration % cfg.logging.log_interval == 0 or last:
                self.metrics.log_interval(interval)
                interval = []
            if cfg.eval.eval_interval and self.iteration % cfg.eval.eval_interval == 0:
                self.metrics.log_eval(self.evaluate("valid"))
            if self.stop.signalled():
                return self._save_and_stop(interval, "interrupted", f"{self.stop.exit_signal or 'signal'} received")
            if last:
                break
            if cfg.training.exit_interval and self.iteration % cfg.training.exit_interval == 0:
                return self._save_and_stop(interval, "exit_interval", "exit interval reached")
            if self.stop.duration_exceeded():
                return self._save_and_stop(interval, "interrupted", "exit_duration_in_mins reached")
            if cfg.checkpoint.save_interval and self.iteration % cfg.checkpoint.save_interval == 0:
                self.save()
        if cfg.eval.eval_interval and self.iteration % cfg.eval.eval_interval != 0:
            self.metrics.log_eval(self.evaluate("valid"))
        if cfg.eval.test_at_end:
            self.metrics.log_eval(self.evaluate("test"))
        self.save()
        return self._stop("finished", f"training finished at iteration {self.iteration}")

    def save(self) -> None:
        with params_synced(self.model), self.metrics.paused():
            self.checkpointer.save(self.iteration, self.consumed_samples)

    def _save_and_stop(self, interval: list[dict], status: str, reason: str) -> int:
        self.metrics.log_interval(interval)
        self.save()
        return self._stop(status, f"{reason}: saved at iteration {self.iteration}, exiting")

    def _stop(self, status: str, message: str) -> int:
        """Report how the run ended (after its last checkpoint exists)."""
        self.checkpointer.finish(blocking=True)
        self._print(message)
        self.checkpointer.record_exit(status, self.iteration, self.stop.exit_signal)
        return 0

    def close(self) -> None:
        self.held.close()

    # ----------------------------------------------------------------------------- logging

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
        described = self.objective.describe()
        if described:
            lines.append(described)
        if self.budget_line:
            lines.append(self.budget_line)
        cost = self.flops.counted.at(self.iteration)
        parts = [f"{name} {value:.4g}" for name, value in vars(cost).items() if value]
        lines.append(
            f"FLOPs per token ({cfg.training.flops_convention} convention, this phase): {cost.total:.4g} = "
            + " + ".join(parts)
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
        parallel.shutdown()
        trainer.close()
