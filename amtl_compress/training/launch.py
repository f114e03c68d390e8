"""How a training command starts and stops on every rank: Ctrl-C and errors raised by all ranks.

This module imports neither torch nor anything that does, so the CLI can use it before the heavy
imports and after a Ctrl-C that may have cut one short:

- :func:`hold_interrupts` holds Ctrl-C while heavy modules import, then raises it;
- :class:`DeferredInterrupt` turns Ctrl-C into a flag that a training loop checks between steps;
- :func:`mark_every_rank` / :func:`raised_on_every_rank` tag an exception that every torchrun
  rank raised, so that it is reported once (rank 0) and the ranks meet before they exit;
- :func:`command_ranks` runs a command's body in the process group (training/distributed.py) and
  hands its outcome to a reporter while the ranks are still together.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from amtl_compress.training.distributed import World

_E = TypeVar("_E", bound=BaseException)

# Attribute set on an exception that every rank raised, so the CLI prints it once (rank 0)
# instead of once per rank.
_EVERY_RANK = "amtl_every_rank"


def torchrun_rank() -> int:
    """This process's torchrun rank, 0 outside torchrun, read from the environment (``RANK``)."""
    value = os.environ.get("RANK", "0")
    return int(value) if value.isdigit() and "WORLD_SIZE" in os.environ else 0


def raised_on_every_rank(exc: BaseException) -> bool:
    """Whether every rank raised ``exc`` (see :func:`mark_every_rank`): the CLI prints it on
    rank 0 only."""
    return bool(getattr(exc, _EVERY_RANK, False))


def mark_every_rank(exc: _E) -> _E:
    """Mark ``exc`` as raised by every rank (a decision taken from values all ranks share, or
    the outcome of ``World.errors_agreed``); returns ``exc``."""
    setattr(exc, _EVERY_RANK, True)
    return exc


@contextlib.contextmanager
def hold_interrupts() -> Iterator[None]:
    """Hold Ctrl-C while the block runs (heavy imports), then raise it as KeyboardInterrupt.

    An import cut short by KeyboardInterrupt can leave a half-initialised module in
    ``sys.modules`` (numpy during ``import torch`` does); where a library swallows that
    interrupt, the run goes on and crashes later with an unrelated error. Outside the main
    thread this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt


class DeferredInterrupt:
    """Turn the first Ctrl-C (SIGINT) into a flag that the loop checks between steps.

    An interrupt in the middle of an optimiser step would leave half-updated weights; deferring
    it lets the loop save a state that resumes exactly. A second Ctrl-C interrupts at once.
    Only the main thread can install signal handlers; elsewhere this does nothing.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None
        self._installed = False

    def __enter__(self) -> DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            previous = self._previous if self._previous is not None else signal.default_int_handler
            signal.signal(signal.SIGINT, previous)


@contextlib.contextmanager
def command_ranks(report: Callable[[BaseException], object]) -> Iterator[World]:
    """Run a command's body on every rank: the process group, and its outcome reported once.

    Enters ``process_group()`` (a single process outside torchrun). An exception leaving the
    block, Ctrl-C included, is passed to ``report`` on each rank that raised it while the process
    group still exists, so rank 0 can print an error that every rank raised before any rank
    exits (torchrun stops the others as soon as one process exits with an error). ``report``
    prints and raises its replacement (e.g. the CLI's exit with a code), or returns to let the
    exception through; a replacement is marked as raised on every rank when the original was,
    so the ranks still meet before the group is torn down. Ctrl-C while torch imports or the
    group is set up is reported the same way.
    """
    reported: list[BaseException] = []

    def hand_over(exc: BaseException) -> None:
        reported.append(exc)
        try:
            report(exc)
        except BaseException as replacement:
            if replacement is not exc and raised_on_every_rank(exc):
                mark_every_rank(replacement)
            raise

    try:
        with hold_interrupts():
            # Here, not at the top: this module stays importable without torch (see above).
            from amtl_compress.training.distributed import process_group
        with process_group() as world:
            try:
                yield world
            except BaseException as exc:
                hand_over(exc)
                raise
    except KeyboardInterrupt as exc:
        if not any(exc is seen for seen in reported):  # imports or setup: outside the group
            hand_over(exc)
        raise
