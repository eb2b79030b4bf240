"""The ``aimctl`` application: the one error boundary, shared options and the console frame
every long-running command uses (:func:`run_console`)."""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

from aim_platform.errors import PlatformError

console = Console(soft_wrap=True)


class _ErrorBoundary(TyperGroup):
    """The one place expected failures become messages: a :class:`PlatformError` prints one
    line and exits with code 2; anything else is a bug and keeps its traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PlatformError as exc:
            console.print(f"error: {exc}", markup=False, highlight=False)
            raise typer.Exit(2) from None


app = typer.Typer(
    no_args_is_help=True,
    add_completion=False,
    help="aimctl: pre-train, evaluate and study Autoregressive Image Models (AIM) on Ray.",
    cls=_ErrorBoundary,
)


# Where Ray's own tools read them: ray.init() takes RAY_ADDRESS when no address is given, the
# Jobs CLI RAY_API_SERVER_ADDRESS, falling back to RAY_ADDRESS.
_CLUSTER_OPT = typer.Option(
    None,
    "--address",
    envvar="RAY_ADDRESS",
    help="Ray cluster to join (auto, HOST:6379); default: $RAY_ADDRESS, else an embedded Ray",
)


_TOKEN_OPT = typer.Option(
    None, "--token-file", help="file with the Ray auth token [default: $RAY_AUTH_TOKEN, ...]"
)


_VERBOSE_OPT = typer.Option(
    False, "--verbose", "-v", help="show Ray's and the workers' logs live instead of a log file"
)
_ADDRESS_OPT = typer.Option(
    None,
    "--address",
    envvar=["RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"],
    help="Ray dashboard, http://HOST:8265 [default: $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS]",
)


def _failed(term: Console, what: str, exc: BaseException, log: Path | None) -> NoReturn:
    from aim_platform.failures import root_cause

    term.print(f"{what} failed: {root_cause(exc)}", markup=False, highlight=False)
    if log:
        term.print(f"the whole story is in the log: {log}", markup=False, highlight=False)
    raise typer.Exit(1)


@contextlib.contextmanager
def run_console(
    what: str,
    header: str,
    log: Path | None,
    *,
    address: str | None = None,
    token_file: Path | None = None,
    ray: bool = True,
) -> Iterator[Console]:
    """The frame of a long-running command: everything but the yielded console goes to
    ``log`` (``--verbose``: None, all on screen); a header line; Ray joined (or started) when
    ``ray``; an unexpected failure becomes one line, its root cause, plus the log's path (the
    tracebacks are in the log), exit 1; ``log:`` last. The Ray this command started is shut
    down while still captured, failed or not: Ray flushes the workers' last lines (on a
    failure, their tracebacks) when it shuts down, which would otherwise reach the terminal."""
    from aim_platform.console import captured_output

    with captured_output(log) as term:
        term.print(header + (f"; log: {log}" if log else ""), markup=False, highlight=False)
        own_ray = False
        try:
            if ray:  # a Ray that cannot start is a failure like any other: one line
                from aim_platform.cluster import connect

                own_ray = connect(address, token_file)
            yield term
        except (PlatformError, typer.Exit, click.exceptions.Exit, click.ClickException):
            raise
        except Exception as exc:  # the job failed: one line here, the tracebacks in the log
            traceback.print_exc()
            _failed(term, what, exc, log)
        finally:
            if own_ray:
                import ray as ray_module

                ray_module.shutdown()
        if log:
            term.print(f"log: {log}", markup=False, highlight=False)


def load_or_fail(path: Path | None, overrides: list[str], cls: type[Any]) -> Any:
    """A config of type ``cls``; a bad one raises ConfigError (one line, exit 2)."""
    from aim_platform.config import load_config

    return load_config(path, overrides, cls)
