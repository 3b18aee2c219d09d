"""How `medmesh up` shows the stack starting: one row per component (Kafka, Orthanc, the seeded
studies, the topics, Triton, each service), waiting / starting / ready with its seconds, fed by
``Stack``'s ``on_step`` callback; or, while every component's output is echoed (``--logs``),
one plain line per step, since a live display and echoed output would overwrite each other.

On a console that is not a terminal (CI, a pipe) rich draws the rows once, when the start ends,
instead of redrawing them.
"""

from __future__ import annotations

import threading
import time
from types import TracebackType
from typing import Self

from rich.console import Console
from rich.progress import Progress, ProgressColumn, SpinnerColumn, Task, TaskID, TextColumn
from rich.text import Text

from medmesh_cli.devstack.stack import READY, STARTING, WAITING


class _StateColumn(ProgressColumn):
    """The step's state: waiting (dim), starting or its detail (yellow), ready (green)."""

    def render(self, task: Task) -> Text:
        state = str(task.fields.get("state", WAITING))
        note = str(task.fields.get("note", ""))
        if state == READY:
            return Text(f"ready{f' ({note})' if note else ''}", style="green")
        if state == WAITING:
            return Text("waiting", style="dim")
        return Text(state, style="yellow")


class _SecondsColumn(ProgressColumn):
    """Seconds since the step started; frozen once it is ready."""

    def render(self, task: Task) -> Text:
        elapsed = task.elapsed
        return Text("" if elapsed is None else f"{elapsed:5.1f} s", style="cyan")


class StartupProgress:
    """A live table of the components starting (a context manager around the start)."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            SpinnerColumn(finished_text=Text("✓", style="green")),
            TextColumn("{task.description:<24}"),
            _StateColumn(),
            _SecondsColumn(),
            console=console,
        )
        self._tasks: dict[str, TaskID] = {}
        self._started: set[str] = set()
        # Triton reports from its starting thread.
        self._lock = threading.Lock()

    def __enter__(self) -> Self:
        self.progress.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.progress.stop()

    def step(self, component: str, state: str, note: str = "") -> None:
        """Show ``component`` in ``state`` (WAITING, STARTING, READY or a detail of its start)."""
        with self._lock:
            task = self._tasks.get(component)
            if task is None:
                task = self.progress.add_task(component, total=1, start=False, state=WAITING)
                self._tasks[component] = task
            if state == WAITING:
                return
            if component not in self._started:
                self._started.add(component)
                self.progress.start_task(task)
            if state == READY:
                self.progress.update(task, completed=1, state=READY, note=note)
                self.progress.stop_task(task)
            else:
                self.progress.update(task, state=state)


class StartupLines:
    """One line per step (not WAITING) with its seconds, for a start whose output is echoed."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._started: dict[str, float] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        return None

    def step(self, component: str, state: str, note: str = "") -> None:
        """Print a line for ``component`` entering ``state`` (WAITING is not printed)."""
        if state == WAITING:
            return
        now = time.monotonic()
        started = self._started.setdefault(component, now)
        if state == STARTING:
            self.console.print(f"[bold]medmesh[/] {component}: starting", highlight=False)
        elif state == READY:
            shown = f" ({note})" if note else ""
            self.console.print(
                f"[bold]medmesh[/] {component}: [green]ready[/]{shown} in {now - started:.1f} s",
                highlight=False,
            )
        else:
            self.console.print(f"[bold]medmesh[/] {component}: {state}", highlight=False)
