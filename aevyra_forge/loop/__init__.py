"""The tuning loop: its ports, its state replayed from the log, the tuner (ask, vet, run,
judge, record) and the assembly of a session for tune and tune resume."""
