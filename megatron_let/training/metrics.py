"""A run's metrics: per-step sums kept on the device, read once per log interval, written to
stdout (Megatron-LM's line format), JSONL and TensorBoard on global rank 0."""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.timers import Timer

from megatron_let.config import LETConfig
from megatron_let.platform.files import write_text_atomic


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


class StepMetrics:
    """A step's numbers, from the device to the log: each step leaves its sums on the device;
    a log interval is finished with one all-reduce and one host read (:meth:`read`), then logged
    and printed in Megatron-LM's line format."""

    def __init__(
        self,
        cfg: LETConfig,
        *,
        start_iteration: int,
        device: torch.device,
        on_cpu: bool,
        metric_labels: dict[str, str],
        weight_label: str = "λ",
    ):
        self.cfg = cfg
        self.device = device
        self.on_cpu = on_cpu
        self.metric_labels = metric_labels  # the objective's metrics: record key → log label
        self.metric_keys = tuple(metric_labels)
        self.weight_label = weight_label
        self.logger = MetricsLogger(cfg, start_iteration)
        self.timer = Timer("interval-time")  # device-synchronised wall time of training steps
        self.timer.start()

    def local_sums(self, lm_outputs: list, objective_sums: Optional[torch.Tensor]) -> torch.Tensor:
        """This rank's share of (Σ LM loss, LM tokens, the objective's sums…, its tokens), on the
        device; summed over ranks, they give the global token-weighted means."""
        values = torch.zeros(3 + len(self.metric_keys), dtype=torch.float64, device=self.device)
        if (
            lm_outputs
            and parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_tensor_model_parallel_rank() == 0
        ):
            values[:2] = torch.stack([item["lm loss"] for item in lm_outputs]).to(torch.float64).sum(0)
        if objective_sums is not None:
            values[2:] = objective_sums
        return values

    def restart_timer(self) -> None:
        self.timer.reset()
        self.timer.start(barrier=True)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Evaluation and saving do not count as training time (Megatron-LM stops its interval
        timer around both)."""
        self.timer.stop()
        try:
            yield
        finally:
            self.timer.start()

    def read(self, steps: list[dict]) -> list[dict]:
        """Finish the records of a log interval: one all-reduce and one host read for all its steps.

        ``step_time_s`` is the interval's wall time (megatron's timer: device synchronised, ranks
        barriered; evaluation and saving excluded) over its steps — Megatron-LM's "elapsed time per
        iteration"; at ``logging.log_interval: 1`` it is each step's own. Peak memory is the
        interval's (reset after each read and when the teacher is released), max over ranks."""
        step_time = self.timer.elapsed(reset=True, barrier=True) / len(steps)
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
        for step, values in zip(steps, sums.tolist()):
            lm_sum, lm_tokens, *objective, objective_tokens = values
            record = {"iteration": step["iteration"], "lm_loss": lm_sum / lm_tokens if lm_tokens > 0 else None}
            for key, value in zip(self.metric_keys, objective):  # NaN: a term the step did not have
                record[key] = value / objective_tokens if objective_tokens > 0 and not math.isnan(value) else None
            record |= {
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

    def log_interval(self, steps: list[dict]) -> None:
        if not steps:
            return
        records = self.read(steps)
        for record in records:
            self.logger.log(record)
        if dist.get_rank() == 0:
            print(self.format(records[-1], records), flush=True)

    def log_eval(self, record: Optional[dict]) -> None:
        if record is None:
            return
        self.logger.log(
            record,
            f" {record['split']} | iteration {record['iteration']} | "
            f"lm loss {record['lm_loss']:.4f} | perplexity {record['perplexity']:.2f}",
        )

    def format(self, record: dict, window: list[dict]) -> str:
        def mean(key: str) -> float:
            values = [r[key] for r in window if r[key] is not None]
            return sum(values) / max(1, len(values))

        measured = any(r["lm_loss"] is not None for r in window)
        parts = [
            f" iteration {record['iteration']:>6}/{self.cfg.training.train_iters}",
            f"lm loss {mean('lm_loss'):.4f}" if measured else "lm loss -",
        ]
        if record["lambda"] > 0 or any(record[key] is not None for key in self.metric_keys):
            parts += [
                f"{label} {record[key]:.4f}" if record[key] is not None else f"{label} -"
                for key, label in self.metric_labels.items()
            ]
            parts.append(f"{self.weight_label} {record['lambda']:.4g}")
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

    def close(self) -> None:
        self.logger.close()
