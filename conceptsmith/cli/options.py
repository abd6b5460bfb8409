"""Options shared by the main app's commands and ``conceptsmith world``'s."""

from typing import Annotated

import typer

DeviceOption = Annotated[str | None, typer.Option(
    help="cuda | cuda:N | mps | cpu (default: the config's, else cuda when available, else mps, else cpu)")]
DtypeOption = Annotated[str | None, typer.Option(help="float32 | float16 | bfloat16 (default: the config's, else float32)")]
