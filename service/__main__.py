"""``python -m service ...`` runs the command line (:mod:`service.cli`)."""

from .cli import app

app(prog_name="python -m service")
