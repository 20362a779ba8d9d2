"""Keep or revert, as pure functions: interval statistics over bench passes, objectives and
SLO scoring, the keep rule, and the verdict for one measurement."""
