"""`python -m embzip ...` runs the command line (the same as the `embzip` script)."""

from .cli import main

main()
