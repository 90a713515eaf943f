"""Data: megatron indexed datasets and their sampler; preprocessing, corpora, tokenizer training."""
