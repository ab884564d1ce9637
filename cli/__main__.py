"""``python -m cli ...`` runs the ``forecaster`` command."""

from cli.main import main

main()
