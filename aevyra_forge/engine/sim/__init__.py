"""The dry-run performance model of the vLLM V1 engine (SPEC §7): boot-time memory budget,
continuous batching, KV capacity, prefix caching, quantization and CUDA graphs."""
