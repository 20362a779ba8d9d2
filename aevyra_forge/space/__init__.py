"""What may be tuned here: the knob registry, the per-run knob space, the flags the
installed vLLM accepts, hardware detection and the GPU catalogue, the model profile and
the playbook."""
