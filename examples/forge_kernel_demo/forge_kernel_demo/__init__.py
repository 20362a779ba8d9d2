"""A sample kernel plug-in for aevyra-forge (examples/forge_kernel_demo/README.md)."""

SWITCH = "FORGE_KERNEL_DEMO"  # the vLLM side stays inert unless this is "1"
MARKER_FILE = "FORGE_KERNEL_DEMO_MARKER"  # optional: also append the proof lines here
REGISTERED = "forge-kernel-demo: registered"
RAN = "forge-kernel-demo: attention kernel ran"
