"""The command line: a thin Typer layer over the importable API."""
