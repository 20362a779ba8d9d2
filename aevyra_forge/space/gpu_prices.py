"""A dated table of on-demand GPU rental prices (USD per GPU-hour) for the GPUs in
space.gpu_catalogue, which the report turns into cost per million tokens. Prices move
monthly and differ 2-4x between providers, so every row is an estimate of one typical
published list price: the T4, L4 and MI300X rows were not re-read from the provider's page
when the table was compiled; the others were read from a transcription of it on the date
noted. `--gpu-price` overrides the table."""

from __future__ import annotations

from dataclasses import dataclass

from aevyra_forge.space.gpu_catalogue import find_gpu_spec

GPU_PRICES_AS_OF = "2026-11-30"  # when this table was compiled


@dataclass(frozen=True)
class GpuPrice:
    """What one GPU costs to rent on demand, USD per GPU-hour, and where that came from."""

    usd_per_hour: float
    source: str


# Keyed by GpuSpec.name. One provider's single-GPU on-demand list price where it rents one,
# else its per-GPU price of a multi-GPU node; no reserved or spot rates.
GPU_PRICES: dict[str, GpuPrice] = {
    # AWS g4dn.xlarge (1x T4), us-east-1 Linux on-demand list price; not re-read: estimate
    "T4": GpuPrice(0.526, "AWS g4dn.xlarge, us-east-1 on-demand (estimate, 2026-11-30)"),
    # AWS g6.xlarge (1x L4), us-east-1 Linux on-demand list price; not re-read: estimate
    "L4": GpuPrice(0.805, "AWS g6.xlarge, us-east-1 on-demand (estimate, 2026-11-30)"),
    # AWS g5.xlarge (1x A10G), us-east-1, $1.006/h as quoted on 2026-06-17
    "A10G": GpuPrice(1.006, "AWS g5.xlarge, us-east-1 on-demand, 2026-06-17"),
    # Lambda 1x A100 SXM 40 GB, lambda.ai/instances as transcribed on 2026-09-20
    "A100-40GB": GpuPrice(1.99, "Lambda 1x A100 SXM 40GB on-demand, 2026-09-20"),
    # Lambda 8x A100 SXM 80 GB, per GPU (no 1x offer), transcribed on 2026-09-20
    "A100-80GB": GpuPrice(2.79, "Lambda 8x A100 SXM 80GB on-demand, per GPU, 2026-09-20"),
    # Lambda 1x H100 SXM, transcribed on 2026-09-20 (8x nodes: $3.99 per GPU)
    "H100": GpuPrice(4.29, "Lambda 1x H100 SXM on-demand, 2026-09-20"),
    # RunPod Secure Cloud H200 (Lambda lists none on demand), recorded on 2026-09-25
    "H200": GpuPrice(4.59, "RunPod Secure Cloud H200 on-demand, 2026-09-25"),
    # Vultr MI300X on-demand as cited in a 2026-05-18 survey; not re-read: estimate
    "MI300X": GpuPrice(1.85, "Vultr MI300X on-demand, per a 2026-05-18 survey (estimate)"),
}


def gpu_price(name: str) -> GpuPrice | None:
    """The table's price for a GPU named as a user or a vendor tool spells it, or None for
    a GPU the catalogue or the table does not know."""
    spec = find_gpu_spec(name)
    return GPU_PRICES.get(spec.name) if spec is not None else None
