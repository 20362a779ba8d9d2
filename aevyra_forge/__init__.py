"""aevyra-forge: tunes a vLLM deployment autonomously — serving config, then
quantization, then kernels — with an audit trail of every experiment."""

__version__ = "0.1.0"
