"""``python -m convergent`` runs the CLI."""

from convergent.cli.app import main

main()
