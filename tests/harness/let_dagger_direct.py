"""Single process: LET†'s first-step alignment loss computed directly — each sample's text by
decoding every prefix with SentencePiece, the teacher's GPT-2 tokens and offsets from a
``tokenizers`` BPE built here from the files, the teacher run on each sample alone (no padding),
the last teacher token ending at or before each target token by brute force, −cos at layer k.

Usage: let_dagger_direct.py --config CFG.yaml --out result.json
"""

import json
import sys

import torch

import harness_args  # tests/harness/, the script's own directory


def main():
    args = harness_args.parse_args()

    import sentencepiece
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from megatron_let.alignment import cosine_similarity
    from megatron_let.model.gpt import unwrap
    from megatron_let.platform import distributed as parallel
    from megatron_let.run_config import load_run_config
    from megatron_let.training.trainer import Trainer

    cfg = load_run_config(args.config, args.set)
    sp = sentencepiece.SentencePieceProcessor(model_file=cfg.data.tokenizer.model)
    bpe = Tokenizer(models.BPE.from_file(cfg.teacher.tokenizer.vocab_file, cfg.teacher.tokenizer.merge_file))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()

    trainer = Trainer(cfg)
    gpt = unwrap(trainer.model[0])
    teacher = trainer.objective.teacher
    captured = {}
    gpt.decoder.layers[trainer.objective.target_layer - 1].register_forward_hook(
        lambda m, i, o: captured.__setitem__("h", o[0].detach())
    )
    eod = cfg.data.eod_token_id
    total, count = 0.0, 0.0
    with torch.no_grad():
        for _ in range(trainer.num_microbatches):
            batch = next(trainer.train_data)
            gpt(batch["tokens"], batch["position_ids"], None)
            for b, sample in enumerate(batch["tokens"].tolist()):
                kept = [t for t in sample if t != eod]
                ends, k = [], 0
                for t in sample:
                    if t != eod:
                        k += 1
                    ends.append(len(sp.decode(kept[:k])) if k else 0)
                text = sp.decode(kept)
                encoding = bpe.encode(text)
                ids = encoding.ids[: cfg.teacher.model.max_position_embeddings]
                states = teacher.hidden_states(torch.tensor([ids]), torch.arange(len(ids))[None], None)[:, 0]
                for i, end in enumerate(ends):
                    before = [j for j, (_, stop) in enumerate(encoding.offsets) if stop <= end]
                    if not before or before[-1] >= len(ids) or batch["loss_mask"][b, i] == 0:
                        continue
                    cos = cosine_similarity(captured["h"][i, b][None], states[before[-1]][None])
                    total += -float(cos)
                    count += 1
    if torch.distributed.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({"alignment_loss": total / count, "tokens": count}, f)
    trainer.close()
    parallel.shutdown()


if __name__ == "__main__":
    sys.exit(main())
