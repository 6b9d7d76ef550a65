"""`python -m edgellm`: the same as the `edgellm` command."""

from edgellm.cli import main

main()
