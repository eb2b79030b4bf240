"""``aimctl``: the platform's command line (typer).

- :mod:`.app`: the application, its one error boundary (an expected failure, a
  :class:`~aim_platform.errors.PlatformError`, prints one line and exits 2) and the console
  frame of long-running commands;
- :mod:`.run`: the jobs (pretrain, study, probe, ingest, tokenizer-fit);
- :mod:`.submit`: jobs on a Ray cluster; :mod:`.services`; :mod:`.bench`; :mod:`.tools`: the
  quick commands (doctor, selfcheck, convert-ml-aim, correlate, plan).
"""

from aim_platform.cli import bench, run, services, submit, tools  # noqa: F401 (commands)
from aim_platform.cli.app import app


def main() -> None:
    """Console-script entry point."""
    app()


__all__ = ["app", "main"]
