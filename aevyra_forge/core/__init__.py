"""Value types every layer shares: experiment records, the recipe, the workload, SLOs, the
run's settings and the error tree. Frozen pydantic models; nothing here does I/O beyond
parsing files a user hands in."""

from __future__ import annotations

from aevyra_forge.core.errors import (
    AgentError,
    ForgeError,
    HardwareError,
    KnobError,
    MissingExtraError,
    PlaybookError,
    RecipeError,
    RunLockedError,
    StoreError,
    UsageError,
    WorkloadError,
)
from aevyra_forge.core.recipe import (
    KernelSettings,
    QuantSettings,
    Recipe,
    diff,
    load_recipe,
    recipe_from_dict,
)
from aevyra_forge.core.settings import TuneSettings
from aevyra_forge.core.slo import Slo, SloTerm, parse_slo
from aevyra_forge.core.trial import Measurement, Trial
from aevyra_forge.core.values import (
    LAYER_NAMES,
    LAYERS,
    SCHEMA_VERSION,
    BenchMetrics,
    BenchOutcome,
    Device,
    ExperimentRecord,
    GpuInfo,
    Hardware,
    LatencyStats,
    LaunchFailure,
    Layer,
    LLMUsage,
    Proposal,
    QualityScore,
    Scalar,
    Status,
    best_record,
    takes_the_lead,
)
from aevyra_forge.core.workload import Request, Workload, WorkloadStats, load_workload

__all__ = [
    "LAYERS", "LAYER_NAMES", "SCHEMA_VERSION", "AgentError", "BenchMetrics",
    "BenchOutcome", "Device", "ExperimentRecord", "ForgeError", "GpuInfo", "Hardware",
    "HardwareError", "KernelSettings", "KnobError", "LLMUsage", "LatencyStats",
    "LaunchFailure", "Layer", "Measurement", "MissingExtraError", "PlaybookError",
    "Proposal", "QualityScore", "QuantSettings", "Recipe", "RecipeError", "Request",
    "RunLockedError", "Scalar", "Slo", "SloTerm", "Status", "StoreError", "Trial",
    "TuneSettings", "UsageError", "Workload", "WorkloadError", "WorkloadStats",
    "best_record", "diff", "load_recipe", "load_workload", "parse_slo",
    "recipe_from_dict", "takes_the_lead",
]
