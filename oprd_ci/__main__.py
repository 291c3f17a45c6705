"""``python -m oprd_ci``: the oprd-ci command line."""

from oprd_ci.cli import app

app(prog_name="oprd-ci")
