"""Which RNG stream each dropout of the real model draws from, under tensor parallelism.

Builds the trainer (``--set`` its layout and dropout), takes the first transformer layer and runs,
in training mode and with the same inputs on every rank:

* its core attention (the attention dropout: megatron's tracker, model-parallel stream);
* its bias-dropout-add (the hidden dropout: the default generator);
* the core attention again after putting the tracker's streams back with
  ``rng.set_tracker_states(rng.tracker_states())`` taken before the first call (a round trip).

Rank 0 writes the gathered outputs to ``OUT`` (a torch file): {"attention": [per rank],
"attention_again": [...], "attention_eval": [...], "hidden": [...], "mp_states": [...], "default_states": [...]}.
"""

import sys

import torch
import torch.distributed as dist

import harness_args  # tests/harness/, the script's own directory


def main():
    args = harness_args.parse_args()

    from megatron.core import parallel_state, tensor_parallel

    from megatron_let.model.gpt import unwrap
    from megatron_let.platform import distributed as parallel
    from megatron_let.platform import rng
    from megatron_let.run_config import load_run_config as load_config
    from megatron_let.training.trainer import Trainer

    trainer = Trainer(load_config(args.config, args.set))
    layer = unwrap(trainer.model[0]).decoder.layers[0]
    layer.train()
    config = layer.config
    tp = parallel_state.get_tensor_model_parallel_world_size()
    heads, groups = config.num_attention_heads // tp, config.num_query_groups // tp
    head_dim = config.kv_channels
    inputs = torch.Generator().manual_seed(0)  # the same inputs on every rank
    s, b = 16, 2
    q = torch.randn(s, b, heads, head_dim, generator=inputs)
    k = torch.randn(s, b, groups, head_dim, generator=inputs)
    v = torch.randn(s, b, groups, head_dim, generator=inputs)
    x = torch.randn(s, b, config.hidden_size, generator=inputs)
    residual = torch.randn(s, b, config.hidden_size, generator=inputs)

    core = layer.self_attention.core_attention
    saved = rng.tracker_states()
    with torch.no_grad():
        attention = core(q, k, v, None)
        rng.set_tracker_states(saved)
        attention_again = core(q, k, v, None)
        hidden = layer.self_attn_bda(True, False)((x, None), residual, layer.hidden_dropout)
        core.eval()
        attention_eval = core(q, k, v, None)
    results = {
        "attention": attention,
        "attention_again": attention_again,
        "attention_eval": attention_eval,
        "hidden": hidden,
        "mp_states": tensor_parallel.get_cuda_rng_tracker().get_states()["model-parallel-rng"],
        "default_states": torch.get_rng_state(),
    }
    gathered = {}
    for name, tensor in results.items():
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        gathered[name] = parts
    if dist.get_rank() == 0:
        torch.save(gathered, args.out)
    trainer.close()
    parallel.shutdown()


if __name__ == "__main__":
    sys.exit(main())
