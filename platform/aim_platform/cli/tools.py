"""``aimctl doctor``, ``selfcheck`` and ``convert-ml-aim``."""

from __future__ import annotations

from pathlib import Path

import typer

from aim_platform.cli.app import app, console


@app.command()
def doctor() -> None:
    """Print versions (Python, torch, Ray, MLflow), the active PIL and the devices seen."""
    from aim_platform.doctor import report

    for key, value in report().items():
        if isinstance(value, list):
            console.print(f"[bold]{key}[/bold]:")
            for line in value:
                console.print(f"  {line}")
        else:
            console.print(f"[bold]{key}[/bold]: {value}")


@app.command()
def selfcheck(steps: int = typer.Option(100, help="pre-training steps on digits")) -> None:
    """ml-aim parity check, then single-process pre-training of aim-tiny on digits."""
    from aim_platform import selfcheck as sc

    if not sc.run(steps=steps, echo=console.print):
        raise typer.Exit(1)


@app.command("convert-ml-aim")
def convert_ml_aim(
    src: Path = typer.Argument(..., exists=True, dir_okay=False, help="official checkpoint"),
    dst: Path = typer.Argument(..., help="where to write the converted classifier"),
) -> None:
    """Convert an official AIM v1 checkpoint (state_dict + ml_aim_config) into ours."""
    from aim_platform.models.interop import convert_file

    out = convert_file(src, dst)  # a refused or malformed SRC: one line naming it, exit 2
    console.print(f"wrote {out}", markup=False, highlight=False)
