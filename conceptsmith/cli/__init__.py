"""The ``conceptsmith`` command line (typer): the app layer, on top of the core and every plugin package.

:mod:`~conceptsmith.cli.commands` holds the app and its main commands, :mod:`~conceptsmith.cli.files` the file
commands (``import``, ``export-lora``), :mod:`~conceptsmith.cli.world` the ``world`` sub-app and
:mod:`~conceptsmith.cli.errors` how a failure is reported. Every command checks its arguments
(:mod:`conceptsmith.validate`) before it imports torch.
"""

from conceptsmith.cli.commands import app, main

__all__ = ["app", "main"]
