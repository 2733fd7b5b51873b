"""`python -m verm_local.cli`: the same as the `verm-local` console script."""

from .main import main

main()
