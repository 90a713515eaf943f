"""The pipeline-stage-aware alignment hook.

* :func:`layer_owner` says which pipeline stage (and virtual chunk) builds global layer k, using
  megatron-core's own layer-offset logic, so uneven / interleaved layouts agree with the model.
* :class:`AlignmentHook` sits on that ``TransformerLayer`` as a forward hook. For each microbatch
  it takes the layer's output (the local sequence shard under sequence parallelism), computes
  λ·L_align against the teacher's hidden states, and ties it to the activation with
  :class:`AlignmentLossScaler`, so the alignment gradient flows in the same, single backward pass
  as the LM loss, before megatron's gradient reduction.

Under full activation recompute layer k runs twice per microbatch: first without a graph (only its
input is kept), then again with one inside the backward pass. The loss is attached once, to the
pass with a graph: the first pass parks the microbatch's teacher state in a queue and the recompute
takes it from there. megatron's schedules run each model chunk's backward passes in the order of
its forward passes (1F1B and interleaved alike), so the queue is first-in first-out.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel.mappings import reduce_from_tensor_model_parallel_region
from megatron.core.transformer.transformer_block import get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
from megatron.core.utils import make_viewless_tensor

from megatron_let.alignment import cca_alignment_loss, cosine_similarity, logsum_distance
from megatron_let.distillation import hint_distance


def layer_owner(config: TransformerConfig, layer: int) -> tuple[int, Optional[int]]:
    """(pipeline rank, virtual stage or None) that builds 1-based global layer ``layer``."""
    pp = config.pipeline_model_parallel_size
    vpp = config.virtual_pipeline_model_parallel_size
    for pp_rank in range(pp):
        for vp_stage in range(vpp) if vpp else [None]:
            offset = get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=pp_rank)
            count = get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=pp_rank)
            if offset < layer <= offset + count:
                return pp_rank, vp_stage
    raise ValueError(f"layer {layer} is not built by any pipeline stage (num_layers={config.num_layers})")


class AlignmentLossScaler(torch.autograd.Function):
    """Identity on the activation; in backward, seeds the alignment loss with ``scale``.

    The MoEAuxLossAutoScaler pattern: the aux loss never joins the scalar LM loss (it may live
    on another pipeline stage), yet its gradient enters the same backward pass. ``scale`` is
    what megatron applies to the main loss: grad_scale_func(1) / num_microbatches.
    """

    @staticmethod
    def forward(ctx, activation: torch.Tensor, aux_loss: torch.Tensor, scale: torch.Tensor):
        ctx.save_for_backward(scale)
        ctx.aux_shape = aux_loss.shape
        return activation

    @staticmethod
    def backward(ctx, grad_activation: torch.Tensor):
        (scale,) = ctx.saved_tensors
        aux_grad = scale.to(grad_activation.device).reshape(()).expand(ctx.aux_shape).clone()
        return grad_activation, aux_grad, None


@dataclass
class AlignmentMetrics:
    """Sums over the microbatches of one step, on this rank: (Σ loss·tokens, Σ cos·tokens, tokens),
    a float64 tensor on the activations' device: accumulated without a host synchronisation per
    microbatch, read once per step by the trainer. None before the first microbatch."""

    sums: Optional[torch.Tensor] = None

    def add(self, values: torch.Tensor) -> None:
        values = values.detach().to(torch.float64)
        self.sums = values if self.sums is None else self.sums + values


class AlignmentHook:
    """Forward hook on the target's layer k. Only the stage that owns layer k creates one.

    ``loss``: LET's ``cosine``, ``logsum`` or ``cca``, or hidden-layer distillation's ``hint``
    (:func:`~megatron_let.distillation.hint_distance` of ``regressor``'s output). A regressor's
    parameters are trained through this hook: it keeps them in every training step's graph, with a
    zero term when no teacher state is armed (megatron's overlapped gradient reduction waits for a
    gradient of every bucketed parameter)."""

    def __init__(
        self,
        layer: torch.nn.Module,
        loss: str = "cosine",
        logsum_exponent: float = 4.0,
        sequence_parallel: bool = False,
        cca_ridge: float = 1e-3,
        regressor: Optional[torch.nn.Module] = None,
    ):
        if (loss == "hint") != (regressor is not None):
            raise ValueError("the hint loss, and only it, takes a regressor")
        self.layer = layer
        self.loss = loss
        self.regressor = regressor
        self.logsum_exponent = logsum_exponent
        self.cca_ridge = cca_ridge
        self.sequence_parallel = sequence_parallel
        self._pending: Optional[tuple] = None
        self._awaiting_recompute: deque = deque()  # microbatches whose layer k runs again in backward
        self.metrics = AlignmentMetrics()
        self._handle = layer.register_forward_hook(self._hook)

    def prepare(
        self, teacher_hidden: torch.Tensor, loss_mask: Optional[torch.Tensor], weight: float, scale: torch.Tensor
    ) -> None:
        """Arm the hook for the next forward of layer k.

        teacher_hidden: [s, b, d_T] full sequence; loss_mask: [b, s] (1 = counted) or None;
        weight: λ at this step; scale: the main loss's gradient scale for this microbatch.
        """
        self._pending = (teacher_hidden, loss_mask, weight, scale)

    def _local_sequence(self, tensor: torch.Tensor) -> torch.Tensor:
        """This TP rank's sequence shard of a [s, ...] tensor (sequence parallelism)."""
        if not self.sequence_parallel:
            return tensor
        rank = parallel_state.get_tensor_model_parallel_rank()
        size = parallel_state.get_tensor_model_parallel_world_size()
        chunk = tensor.shape[0] // size
        return tensor[rank * chunk : (rank + 1) * chunk]

    def _hook(self, module, inputs, output):
        if not torch.is_grad_enabled():
            if self._pending is not None:  # the first, graph-less pass of a recomputed layer
                self._awaiting_recompute.append(self._pending)
                self._pending = None
            return output
        if self._pending is not None:
            teacher_hidden, loss_mask, weight, scale = self._pending
            self._pending = None
        elif self._awaiting_recompute:  # the recompute, in the backward pass
            teacher_hidden, loss_mask, weight, scale = self._awaiting_recompute.popleft()
        elif self.regressor is not None:
            return self._attach(output, self._regressor_in_graph(), torch.ones(1, device=self._device(output)))
        else:
            return output  # e.g. no teacher for this microbatch
        hidden = output[0] if isinstance(output, tuple) else output
        student = hidden if self.regressor is None else self.regressor(hidden)

        teacher_local = self._local_sequence(teacher_hidden)  # [s_local, b, d_T]
        if loss_mask is None:
            mask_local = torch.ones(hidden.shape[:2], device=hidden.device)
            total_tokens = torch.tensor(float(teacher_hidden.shape[0] * teacher_hidden.shape[1]), device=hidden.device)
        else:
            mask_local = self._local_sequence(loss_mask.t().to(hidden.device, torch.float32))
            total_tokens = loss_mask.sum().clamp(min=1).to(hidden.device, torch.float32)  # stays on the device

        cos = cosine_similarity(student, teacher_local)  # [s_local, b], fp32
        if self.loss == "cca":
            # One value per microbatch, from statistics summed over the sequence shards (SP): the
            # same on every TP rank, each rank's backward reaching its own tokens.
            reduce = reduce_from_tensor_model_parallel_region if self.sequence_parallel else None
            microbatch_loss = cca_alignment_loss(hidden, teacher_local, mask_local, self.cca_ridge, reduce)
            aux = weight * microbatch_loss
            # As a token-weighted sum (this shard's tokens), so that the metrics' sums give the loss.
            local_loss = microbatch_loss * mask_local.sum() / total_tokens
        else:
            if self.loss == "cosine":
                per_token = -cos
            elif self.loss == "hint":
                per_token = hint_distance(student, teacher_local)
            else:
                per_token = logsum_distance(hidden, teacher_local, self.logsum_exponent)
            # Local sum over the global token count: summed over TP shards (SP) this is the
            # per-token mean of the whole microbatch.
            local_loss = (per_token * mask_local).sum() / total_tokens
            aux = weight * local_loss

        with torch.no_grad():
            self.metrics.add(torch.stack([local_loss * total_tokens, (cos * mask_local).sum(), mask_local.sum()]))
        return self._attach(output, aux, scale)

    def _regressor_in_graph(self) -> torch.Tensor:
        """0 · Σ parameters: a zero loss that gives each regressor parameter a (zero) gradient."""
        assert self.regressor is not None
        return torch.stack([p.sum() for p in self.regressor.parameters()]).sum() * 0.0

    @staticmethod
    def _device(output) -> torch.device:
        return (output[0] if isinstance(output, tuple) else output).device

    @staticmethod
    def _attach(output, aux: torch.Tensor, scale: torch.Tensor):
        """``output`` with ``aux`` tied to its backward (seeded with ``scale``)."""
        hidden = output[0] if isinstance(output, tuple) else output
        # A custom Function returning its input gives a view of it; at the end of a pipeline stage
        # (or virtual chunk) that view becomes the stage output, which megatron frees after sending
        # (deallocate_pipeline_outputs) and so must not be a view.
        hidden = make_viewless_tensor(
            AlignmentLossScaler.apply(hidden, aux, scale), requires_grad=True, keep_graph=True
        )
        if isinstance(output, tuple):
            return (hidden,) + tuple(output[1:])
        return hidden

    def take_metrics(self) -> AlignmentMetrics:
        """This step's sums (call after the step's backward passes)."""
        if self._awaiting_recompute:
            raise RuntimeError(
                f"{len(self._awaiting_recompute)} microbatch(es) ran layer "
                f"{self.layer.layer_number} without a graph and were never recomputed: "
                "their alignment loss was not applied"
            )
        metrics, self.metrics = self.metrics, AlignmentMetrics()
        return metrics

    def remove(self) -> None:
        self._handle.remove()
        self._pending = None
        self._awaiting_recompute.clear()


def find_layer(model_chunks: list, layer_number: int) -> Optional[torch.nn.Module]:
    """The TransformerLayer with global 1-based ``layer_number`` among this rank's chunks."""
    from megatron_let.model.gpt import unwrap

    for chunk in model_chunks:
        decoder = getattr(unwrap(chunk), "decoder", None)
        for layer in getattr(decoder, "layers", []):
            if layer.layer_number == layer_number:
                return layer
    return None


def main_loss_scale(config: TransformerConfig, num_microbatches: int, device) -> torch.Tensor:
    """The factor megatron applies to each microbatch's LM loss before backward."""
    one = torch.ones(1, device=device)
    scale = config.grad_scale_func(one) if config.grad_scale_func is not None else one
    return scale / num_microbatches
