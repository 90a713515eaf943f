"""The GPT as megatron-core builds it: layer specs, layers, layout-independent initial weights."""
