"""Value types every layer shares: experiment records, the recipe, the workload, SLOs, the
run's settings and the error tree. Frozen pydantic models; nothing here does I/O beyond
parsing files a user hands in."""
