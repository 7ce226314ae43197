"""`ema-serving`: serve exports locally, query them, and compare the live and EMA arms.

This module only assembles the command group; each command lives beside the library code it translates for
(`serving.server_cli` for `serve`, `serving.client_cli` for the client commands).
"""

from __future__ import annotations

import importlib

import click

# (module, command attribute) pairs; a module that is not there yet simply contributes no command.
_COMMANDS = (
    ("serving.server_cli", "serve"),
    ("serving.client_cli", "predict"),
    ("serving.client_cli", "compare"),
    ("serving.client_cli", "merge"),
    ("serving.client_cli", "metadata"),
    ("serving.client_cli", "status"),
    ("serving.canary_cli", "canary"),
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Serve ema-export SavedModels and query or A/B-compare their serve_live and serve_ema signatures."""


def _register() -> None:
    for module_name, attribute in _COMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != module_name:
                raise
            continue
        main.add_command(getattr(module, attribute))


_register()
