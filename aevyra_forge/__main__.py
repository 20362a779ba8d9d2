"""`python -m aevyra_forge` runs the command line."""

from aevyra_forge.cli import main

main()
