"""What every command shares: error handling, consoles, progress, report writing.

Errors become one or two plain lines on stderr and the exit codes of the README;
a traceback only with `optimodel --debug`.
"""

from __future__ import annotations

import functools
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from optimodel.errors import OptimodelError

F = TypeVar("F", bound=Callable[..., Any])

STATE = {"debug": False}
console = Console(highlight=False, soft_wrap=False)
err_console = Console(stderr=True, highlight=False, soft_wrap=True)


def print_error(message: str, hint: str | None = None) -> None:
    err_console.print(f"[bold red]error:[/] {message}", markup=True, highlight=False)
    if hint:
        err_console.print(f"  {hint}", markup=False)


def _name_the_file(message: str, kwargs: dict[str, Any]) -> str:
    """Prefix the model path when an error (e.g. about an input) does not name a file."""
    models = kwargs.get("model") or kwargs.get("models")
    paths = [models] if isinstance(models, (str, Path)) else list(models or [])
    if not paths or any(Path(p).name in message for p in paths):
        return message
    for key in ("data", "calib_data", "eval_data", "config"):
        value = kwargs.get(key)
        if value and Path(str(value)).name in message:
            return message
    return f"{paths[0]}: {message}"


def handle_errors(func: F) -> F:
    """Turn OptimodelError (and anything unexpected) into a clean exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from optimodel.modelio import model_scope

        try:
            with model_scope():
                return func(*args, **kwargs)
        except (typer.Exit, typer.Abort):
            raise
        except OptimodelError as exc:
            if STATE["debug"]:
                traceback.print_exc()
            message = _name_the_file(exc.message, kwargs)
            print_error(message.replace("[", "\\["), exc.hint)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            print_error("interrupted")
            raise typer.Exit(130) from None
        except MemoryError:
            print_error("out of memory")
            raise typer.Exit(1) from None
        except Exception as exc:  # the last line of defence: never a bare traceback
            if STATE["debug"]:
                traceback.print_exc()
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            print_error(
                f"internal error: {type(exc).__name__}: {text}".replace("[", "\\["),
                "run again with `optimodel --debug ...` for the traceback and report it",
            )
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def _bar(*extra: TextColumn) -> Progress:
    """The progress bar every command draws on stderr: label, bar, M/N, elapsed (+ extra)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        *extra,
        console=err_console,
        transient=True,
    )


@contextmanager
def feed_progress(total: int | None, label: str, quiet: bool) -> Iterator[Callable[[], None]]:
    """A rich progress bar on stderr; a no-op when quiet or not a terminal."""
    if quiet or not sys.stderr.isatty():
        yield lambda: None
        return
    progress = _bar()
    with progress:
        task = progress.add_task(label, total=total)
        yield lambda: progress.advance(task)


@contextmanager
def calibration_bar(quiet: bool) -> Iterator[None]:
    """Samples calibrated and resident memory on stderr while static quantization runs.

    Calibration can take minutes on a big model and a big data set: the bar shows that it
    moves and that memory stays flat (statistics are streamed chunk by chunk).
    """
    from optimodel.quant.calibration import calibration_progress
    from optimodel.runtime.bench import _proc_status_kb

    if quiet or not sys.stderr.isatty():
        yield
        return
    progress = _bar(TextColumn("RSS {task.fields[rss]}"))

    def update(done: int, total: int) -> None:
        kb = _proc_status_kb("VmRSS")
        rss = f"{kb / 1024:,.0f} MB" if kb else "?"
        progress.update(task, completed=done, total=total, rss=rss)
        if done in (1, total):  # drawn at least once however fast calibration runs
            progress.refresh()

    with progress:
        task = progress.add_task("calibrating", total=None, rss="-")
        with calibration_progress(update):
            yield


def write_reports(report: Any, paths: list[Path], quiet: bool) -> None:
    from optimodel.report import write_report

    for path in paths:
        write_report(report, path)
        if not quiet:
            err_console.print(f"report written to {path}", markup=False)
