"""Measuring a live OpenAI-compatible server: the streaming bench client, metric
aggregation with vllm bench serve's definitions, and the accuracy probe against the
baseline's outputs."""
