"""Executing one trial: booting and tearing down vllm serve, failure classification,
benchmarking the live server; engine/sim is the dry-run simulator that answers in its
place."""
