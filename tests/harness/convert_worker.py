"""Conversion checks that need megatron-core in CPU mode, run as ``convert_worker.py JOBS.json``
under torchrun (tensor parallel size = the number of processes) or as a plain process (TP=1).

JOBS.json is a list of jobs, run in order; each job is a dict with a "kind":

* hf_logits    {hf, gguf?, tokens, out}: load_hf → shard for this TP → GPTModel; rank 0 saves the
               gathered logits [b, s, vocab] and final hidden states [b, s, h] to ``out``.
* cli          {argv}: ``megatron_let.convert.main(argv)`` (import/export at TP=1).
* ckpt_logits  {ckpt, tokens, out}: build the checkpoint's model at this TP, load it as a teacher
               is loaded (checkpoint.load_model_weights), save logits/hidden like hf_logits.
* random_ckpt  {model, out, tokens, logits_out?, shards_out?, pp?, randomise?}: a randomly initialised
               model saved as a training checkpoint at iteration 7 (with ``pp``: TP=1 × PP=pp instead
               of TP=world); its logits (PP=1 only); each rank's state dict, layers numbered globally,
               to ``shards_out`` with ``{rank}`` filled in. ``randomise``: every parameter drawn
               around 0 (norm weights around 1) instead of megatron's init (zero biases, unit norms
               would hide a swapped bias or norm), the same on every rank that holds a replica.
* hf_teacher   {hf, tokens, out}: the trainer's Teacher (objectives.teacher) at this TP, its weights
               read from the Hugging Face directory in this process; rank 0 saves its final hidden
               state [b, s, h] and its logits [b, s, V] (gathered over TP) to ``out``.
* read_ckpt    {ckpt, out}: read_checkpoint (TP=PP=1) → (ModelConfig dict, state dict) to ``out``.
"""

import dataclasses
import json
import os
import re
import sys
import time
import zlib

import torch
import torch.distributed as dist


def main():
    from megatron.core import parallel_state

    from megatron_let import checkpoint, convert
    from megatron_let.config import LETConfig, ModelConfig, ParallelConfig, to_dict
    from megatron_let.model.gpt import build_gpt, transformer_config
    from megatron_let.platform import distributed as parallel

    jobs = json.loads(open(sys.argv[1]).read())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", sys.argv[2] if len(sys.argv) > 2 else "29511")

    def layout(tp: int, pp: int) -> None:
        parallel.init_distributed(
            LETConfig(
                device="cpu", parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
            )
        )

    layout(world, 1)
    rank = parallel_state.get_tensor_model_parallel_rank()

    def build(model: ModelConfig, pp: int = 1):
        tp = world // pp
        config = transformer_config(model, tensor_parallel=tp, pipeline_parallel=pp, on_cpu=True)
        gpt = build_gpt(
            model,
            config,
            use_te=False,
            tensor_parallel=tp,
            pre_process=parallel_state.is_pipeline_first_stage(),
            post_process=parallel_state.is_pipeline_last_stage(),
        )
        return gpt.eval()

    def run(gpt, tokens_path: str, vocab: int) -> dict:
        tokens = torch.load(tokens_path)
        captured = {}
        hook = gpt.decoder.register_forward_hook(lambda m, i, o: captured.__setitem__("hidden", o))
        b, s = tokens.shape
        with torch.no_grad():
            logits = gpt(tokens, torch.arange(s).unsqueeze(0).expand(b, s), None)
        hook.remove()
        parts = [torch.empty_like(logits) for _ in range(world)]
        dist.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
        return {"logits": torch.cat(parts, dim=-1)[..., :vocab], "hidden": captured["hidden"].transpose(0, 1)}

    def randomise(gpt) -> None:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        with torch.no_grad():
            for name, param in gpt.named_parameters():
                sharded = getattr(param, "tensor_model_parallel", False)
                seed = zlib.crc32(name.encode()) + 1000 * pp_rank + (100_000 * (tp_rank + 1) if sharded else 0)
                gen = torch.Generator().manual_seed(seed)
                mean = 1.0 if param.dim() == 1 and "norm" in name and name.endswith("weight") else 0.0
                param.copy_(mean + 0.1 * torch.randn(param.shape, generator=gen))

    def save(obj, path: str) -> None:
        if dist.get_rank() == 0:
            torch.save(obj, path)

    for job in jobs:
        kind = job["kind"]
        start = time.time()
        if kind == "hf_logits":
            model, full = convert.load_hf(job["hf"], job.get("gguf"))
            gpt = build(model)
            convert.load_into(gpt, convert.shard_state_dict(full, model, rank, world))
            del full
            save(run(gpt, job["tokens"], model.vocab_size), job["out"])
        elif kind == "hf_teacher":
            from megatron_let.config import TeacherConfig
            from megatron_let.objectives.teacher import Teacher

            teacher_cfg = TeacherConfig(model=convert.hf_model_config(job["hf"]), hf_path=job["hf"], precision="fp32")
            teacher = Teacher(teacher_cfg, teacher_layer=None, on_cpu=True, use_te=False)
            teacher.load_hugging_face(job["hf"])
            tokens = torch.load(job["tokens"])
            b, s = tokens.shape
            positions = torch.arange(s).unsqueeze(0).expand(b, s)
            hidden = teacher.hidden_states(tokens, positions, None)
            logits = teacher.logits(tokens, positions, None)  # [s, b, V/TP]: what logit distillation reads
            parts = [torch.empty_like(logits) for _ in range(world)]
            dist.all_gather(parts, logits.contiguous(), group=parallel_state.get_tensor_model_parallel_group())
            vocab = teacher_cfg.model.vocab_size
            save(
                {"hidden": hidden.transpose(0, 1), "logits": torch.cat(parts, dim=-1)[..., :vocab].transpose(0, 1)},
                job["out"],
            )
        elif kind == "cli":
            assert convert.main(job["argv"]) == 0, job["argv"]
        elif kind == "ckpt_logits":
            _, model = convert.megatron_io.checkpoint_model_config(job["ckpt"])
            gpt = build(model)
            checkpoint.load_model_weights(job["ckpt"], gpt)
            save(run(gpt, job["tokens"], model.vocab_size), job["out"])
        elif kind == "random_ckpt":
            model, pp = ModelConfig(**job["model"]), job.get("pp", 1)
            if pp > 1:
                layout(world // pp, pp)
            gpt = build(model, pp)
            if job.get("randomise"):
                randomise(gpt)
            config = to_dict(
                LETConfig(
                    model=model,
                    parallel=ParallelConfig(tensor_model_parallel_size=world // pp, pipeline_model_parallel_size=pp),
                )
            )
            checkpoint.save_checkpoint(job["out"], 7, [gpt], None, None, 0, config)
            if pp == 1 and "logits_out" in job:
                save(run(gpt, job["tokens"], model.vocab_size), job["logits_out"])
            offset = parallel_state.get_pipeline_model_parallel_rank() * (model.num_layers // pp)
            shard = {
                re.sub(
                    r"^decoder\.layers\.(\d+)\.", lambda m, offset=offset: f"decoder.layers.{int(m[1]) + offset}.", k
                ): v
                for k, v in gpt.state_dict().items()
                if not k.endswith("_extra_state")
            }
            if "shards_out" in job:
                torch.save(shard, job["shards_out"].format(rank=dist.get_rank()))
            if pp > 1:
                layout(world, 1)
        elif kind == "read_ckpt":
            model, state = convert.read_checkpoint(job["ckpt"])
            save({"config": dataclasses.asdict(model), "state": state}, job["out"])
        else:
            raise ValueError(f"unknown job kind {kind!r}")
        dist.barrier()
        if dist.get_rank() == 0:
            print(f"{kind}: {time.time() - start:.1f}s", flush=True)
    parallel.shutdown()


if __name__ == "__main__":  # the dist-checkpoint writer's workers re-import __main__
    from megatron_let.platform.cpu import cpu_mode

    with cpu_mode():
        sys.exit(main())
