"""Data-parallel runs: one process per rank under ``torchrun``, DDP over gloo (CPU) or nccl (GPU).

``torchrun --nproc_per_node=W -m amtl_compress finetune ...`` starts W copies of the command, each
with ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in its
environment. :func:`process_group` turns that environment into a :class:`World` and tears the
process group down on every exit path; without it (a plain single-process run) the World is rank 0
of 1, and none of its methods touches ``torch.distributed``.

Every collective here must be called by every rank, in the same order, or the ranks wait for each
other forever. The training code therefore bases every decision that changes which collectives run
(stop, raise, save) on values all ranks share: a reduced flag, a gathered error, identical weights.
docs/scaling.md describes what is sharded and what is replicated.
"""

from __future__ import annotations

import contextlib
import errno
import gc
import inspect
import os
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor, nn

from amtl_compress import errors
from amtl_compress.errors import AmtlError, ConfigError, TrainingError
from amtl_compress.training.launch import mark_every_rank, raised_on_every_rank

__all__ = ["TORCHRUN_ENV", "World", "launched_by_torchrun", "process_group", "wrap_ddp"]

#: The variables torchrun sets for every worker; all or none must be present.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def launched_by_torchrun() -> bool:
    """Whether this process is a worker started by torchrun (its environment is complete).

    Raises:
        ConfigError: some but not all of :data:`TORCHRUN_ENV` are set, or they are not integers
            in range.
    """
    present = [name for name in TORCHRUN_ENV if name in os.environ]
    if not present:
        return False
    missing = [name for name in TORCHRUN_ENV if name not in os.environ]
    if missing:
        raise ConfigError(
            f"the torchrun environment is half set (`{'`, `'.join(present)}` set, "
            f"`{'`, `'.join(missing)}` missing); launch with `torchrun`, or unset "
            f"`{'`, `'.join(present)}` for a single-process run"
        )
    rank, world_size, local_rank = (_env_int(n) for n in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    if world_size < 1 or not 0 <= rank < world_size or local_rank < 0:
        raise ConfigError(
            f"torchrun environment out of range: `RANK`={rank}, `WORLD_SIZE`={world_size}, "
            f"`LOCAL_RANK`={local_rank}; launch with `torchrun` rather than setting them by hand"
        )
    return True


def _env_int(name: str) -> int:
    value = os.environ[name]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(
            f"environment variable `{name}` is `{value}`, not an integer; launch with `torchrun`"
        ) from None


@dataclass(frozen=True)
class World:
    """The ranks of a run and the collectives the training loops use.

    Attributes:
        rank: this process's rank in [0, size).
        size: W, the number of processes (1 = a single-process run).
        device: where this rank computes: ``cuda:LOCAL_RANK`` under nccl, else the CPU.
        active: a torch.distributed process group exists (False: every method is local).
    """

    rank: int = 0
    size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    active: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0: the one rank that shows progress and writes files."""
        return self.rank == 0

    def _collective(self, tensor: Tensor) -> Tensor:
        # nccl only reduces tensors on this rank's GPU; gloo takes CPU tensors.
        return tensor.to(self.device)

    def all_reduce_(self, tensor: Tensor, op: str = "sum") -> Tensor:
        """Reduce ``tensor`` over all ranks (``op``: ``"sum"``, ``"max"`` or ``"min"``).

        Returns the reduced tensor (same shape, dtype and device as ``tensor``; ``tensor`` itself
        where no copy to the collective device was needed).
        """
        if not self.active:
            return tensor
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        moved = self._collective(tensor)
        dist.all_reduce(moved, op=ops[op])
        if moved is not tensor:
            tensor.copy_(moved)
        return tensor

    def any_rank(self, *flags: bool) -> tuple[bool, ...]:
        """For each flag, whether it is true on at least one rank; one all-reduce for all.

        Every rank gets the same answers, so a decision taken from them (stop, raise) is taken
        by every rank at the same step.
        """
        if not self.active:
            return tuple(bool(f) for f in flags)
        reduced = self.all_reduce_(torch.tensor([int(f) for f in flags]), "max")
        return tuple(bool(v) for v in reduced.tolist())

    def gather_rows(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (lengths along dim 0 may differ), in rank order, on the CPU.

        Args:
            tensor: (rows_r, ...) on this rank; the trailing shape and dtype must agree.

        Returns:
            W tensors, entry r being rank r's (rows_r, ...).
        """
        if not self.active:
            return [tensor.cpu()]
        rows = self._collective(torch.tensor([tensor.shape[0]], dtype=torch.int64))
        all_rows = [torch.zeros_like(rows) for _ in range(self.size)]
        dist.all_gather(all_rows, rows)
        counts = [int(r.item()) for r in all_rows]
        # all_gather needs equal shapes: pad to the longest shard, trim after.
        padded = tensor.new_zeros((max(counts), *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        padded = self._collective(padded)
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return [part[:n].cpu() for part, n in zip(parts, counts, strict=True)]

    def check_same(self, what: str, tensor: Tensor) -> None:
        """Raise TrainingError on every rank if ``tensor`` differs between ranks.

        Compares an order-sensitive int64 checksum (overflow wraps, deterministically), so it
        costs one small all-reduce whatever the size of ``tensor``.

        Args:
            what: names the tensor in the error, e.g. ``lengths of `embeddings.user_id```.
            tensor: integer (any shape), e.g. int64 (N,) row lengths.
        """
        if not self.active:
            return
        flat = tensor.detach().reshape(-1).to(device="cpu", dtype=torch.int64)
        weights = torch.arange(flat.numel(), dtype=torch.int64) % 65_521 + 1
        checksum = torch.stack([(flat * weights).sum(), flat.sum()])
        both = torch.cat([checksum, -checksum])  # max over ranks of c and of -c: max and -min
        both = self.all_reduce_(both, "max")
        if not torch.equal(both[:2], -both[2:]):
            raise TrainingError(
                f"the {what} differ between ranks; the ranks' weights diverged - rerun, and "
                "report it if it happens again (docs/scaling.md)"
            )

    @contextlib.contextmanager
    def errors_agreed(self) -> Iterator[None]:
        """Run a block that may fail on some ranks only; then every rank fails, or none does.

        Ends with one collective (a gather of each rank's error or None), so a rank that failed,
        e.g. on a bad row in its shard of the data, does not leave the others waiting in the next
        collective. The lowest failing rank's error is raised on every rank: its own exception
        there, the same class and message elsewhere (an :class:`AmtlError` naming the rank and
        class where the class is not one of amtl_compress.errors). The raised exception is marked
        so :func:`raised_on_every_rank` is true for it.
        """
        if not self.active:
            yield
            return
        error: Exception | None = None
        try:
            yield
        except Exception as exc:  # re-raised below, on every rank
            error = exc
        payload = None if error is None else _describe(error)
        gathered: list[tuple[str, str, str | None] | None] = [None] * self.size
        dist.all_gather_object(gathered, payload)
        failed = [(rank, p) for rank, p in enumerate(gathered) if p is not None]
        if not failed:
            return
        rank, described = failed[0]
        if rank == self.rank and error is not None:
            raise mark_every_rank(error)
        raise mark_every_rank(_rebuild(rank, *described)) from None


def _describe(exc: Exception) -> tuple[str, str, str | None]:
    """(class name, one-line message, file name) of ``exc``: what another rank needs to raise it."""
    filename = getattr(exc, "filename", None)
    return type(exc).__name__, str(exc), None if filename is None else str(filename)


def _rebuild(rank: int, name: str, message: str, filename: str | None) -> Exception:
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, AmtlError):
        return cls(message)
    if name == "FileNotFoundError":
        return FileNotFoundError(errno.ENOENT, message, filename)
    return AmtlError(f"rank {rank} failed with {name}: {message}; see that rank's traceback")


@contextlib.contextmanager
def process_group() -> Iterator[World]:
    """The :class:`World` of this process, with a process group while the block runs.

    - launched by torchrun: ``init_process_group`` (nccl when CUDA is available, each rank on
      ``cuda:LOCAL_RANK``; gloo on the CPU otherwise), destroyed when the block exits, however
      it exits. When the block ends normally, or with an error every rank raised
      (:func:`raised_on_every_rank`), the ranks first wait for each other, so a command can
      print its result or error on rank 0 inside the block before any rank exits. The block
      must not keep a reference to a DDP model (:func:`wrap_ddp`) in its own frame: create and
      use it in a function called from the block;
    - a process group already exists (the caller runs its own DDP script): used as is, left
      alone;
    - otherwise: rank 0 of 1, and torch.distributed is not touched.

    Raises:
        ConfigError: a half-set torchrun environment (see :func:`launched_by_torchrun`).
    """
    if dist.is_available() and dist.is_initialized():
        yield _existing_world()
        return
    if not launched_by_torchrun():
        yield World()
        return
    if not dist.is_available():
        raise ConfigError(
            "this torch build has no torch.distributed; install a build with it to use torchrun"
        )
    local_rank = _env_int("LOCAL_RANK")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    orderly = False
    try:
        yield World(dist.get_rank(), dist.get_world_size(), device, active=True)
        orderly = True
    except BaseException as exc:
        # Every rank raised it at the same point: they can meet once more (below).
        orderly = raised_on_every_rank(exc)
        _release_frames(exc)
        raise
    finally:
        try:
            if orderly:
                # No rank leaves before all got here: torchrun stops the others as soon as one
                # process exits with an error, and rank 0 may still be printing the error.
                dist.barrier()
        finally:
            # A DDP model that outlives the process group keeps gloo's threads alive into the
            # interpreter's shutdown, where one of them can abort the process ("terminate
            # called without an active exception"; up to 1 run in 6 without it). DDP
            # sits in a reference cycle, so collect it first.
            gc.collect()
            dist.destroy_process_group()


def _release_frames(exc: BaseException) -> None:
    """Drop the local variables of the finished frames in ``exc``'s traceback and its causes,
    so the models they reference can be freed while the exception propagates."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        traceback.clear_frames(current.__traceback__)
        current = current.__cause__ or current.__context__


def _existing_world() -> World:
    backend = dist.get_backend()
    if backend == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    return World(dist.get_rank(), dist.get_world_size(), device, active=True)


def wrap_ddp(model: nn.Module, world: World) -> nn.Module:
    """``model`` in DistributedDataParallel when ``world`` is active, else ``model`` itself.

    Call it after every module that trains (the AMTL layers included) is attached, and after the
    weights are final (resume loaded): DDP copies rank 0's parameters and buffers (AMTL's
    frequency tables and price, PCA rotations) to every rank now, and registers gradient hooks
    on exactly the parameters present now. Buffers are not re-sent at every forward
    (``forward_sync_buffers=False``, torch >= 2.13): the only one that changes in training, the
    budget's price, is recomputed from identical weights on every rank, and re-sending an AMTL
    layer's (N,) frequency index every step would cost more than the step. Older torch has only
    ``broadcast_buffers``, whose ``False`` also skips the copy at wrap time that the ranks rely
    on; there DDP's default (re-send at every forward) is kept: correct, slower.
    """
    if not world.active:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [world.device] if world.device.type == "cuda" else None
    accepted = inspect.signature(DistributedDataParallel.__init__).parameters
    options = {"forward_sync_buffers": False} if "forward_sync_buffers" in accepted else {}
    return DistributedDataParallel(model, device_ids=device_ids, **options)
