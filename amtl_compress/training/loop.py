"""The shared pieces of every training loop: evaluation and one optimisation step.

Both work alike in a single process and on one rank of a data-parallel run (``world``, see
training/distributed.py): a step then averages its gradients over the ranks (DDP), and an
evaluation splits the batches over the ranks and scores the gathered predictions.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from amtl_compress.errors import AmtlError, TrainingError
from amtl_compress.models.adapters.call import ModelCall
from amtl_compress.training.distributed import World
from amtl_compress.training.launch import mark_every_rank
from amtl_compress.training.metrics import logloss, roc_auc

Batch = tuple[dict[str, torch.Tensor], torch.Tensor]


def logits_of(
    model: nn.Module, features: dict[str, torch.Tensor], call: ModelCall | None = None
) -> torch.Tensor:
    """The model's logits (B,) for a batch: ``model(features)``, or through ``call`` (its adapter,
    and probabilities turned into logits; models/adapters/call.py)."""
    if call is None:
        return model(features).reshape(-1)
    return call(model, features)


def device_of(model: nn.Module) -> torch.device:
    """The device of ``model``'s first parameter (the CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _to(device: torch.device, features: dict[str, torch.Tensor], labels: torch.Tensor) -> Batch:
    # .to() returns the tensor itself when it is already there: free on the CPU.
    return {k: v.to(device) for k, v in features.items()}, labels.to(device)


@torch.no_grad()
def predict(
    model: nn.Module, batches: Iterable[Batch], call: ModelCall | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` in eval mode over ``batches`` (moved to the model's device); ``call``: how
    (:func:`logits_of`; default ``model(features)``, whose output is logits).

    Returns:
        (logits float32 (rows,), labels float32 (rows,)) on the CPU, concatenated in batch order;
        both empty when there are no batches.
    """
    was_training = model.training
    model.eval()
    device = device_of(model)
    logits, labels = [], []
    try:
        for features, y in batches:
            features, y = _to(device, features, y)
            logits.append(logits_of(model, features, call).float().reshape(-1).cpu())
            labels.append(y.float().reshape(-1).cpu())
    finally:
        model.train(was_training)
    if not logits:
        return torch.empty(0), torch.empty(0)
    return torch.cat(logits), torch.cat(labels)


def predict_sharded(
    model: nn.Module, batches: Iterable[Batch], world: World, call: ModelCall | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`predict` over all of ``batches``, computed by the W ranks together.

    Every rank iterates the same (unsharded) batches and scores batches r, r + W, r + 2W, ...;
    the predictions are then gathered and put back in batch order, so every rank returns what
    one process would have (each batch is scored by the same model on the same rows). No row is
    dropped, unlike the training shards, which are truncated to equal sizes.

    Returns:
        (logits float32 (rows,), labels float32 (rows,)) of all batches, on every rank.
    """
    mine = (b for i, b in enumerate(batches) if i % world.size == world.rank)
    sizes: list[int] = []

    def counted(source: Iterator[Batch]) -> Iterator[Batch]:
        for features, y in source:
            sizes.append(int(y.shape[0]))
            yield features, y

    with world.errors_agreed():  # a bad cell in the data: every rank reads it, all raise once
        logits, labels = predict(model, counted(mine), call)
    rows = world.gather_rows(torch.stack([logits, labels], dim=1))
    batch_sizes = world.gather_rows(torch.tensor(sizes, dtype=torch.int64))
    chunks = [
        list(r.split(s.tolist())) if s.numel() else []
        for r, s in zip(rows, batch_sizes, strict=True)
    ]
    ordered = [
        chunks[i % world.size][i // world.size]
        for i in range(sum(len(c) for c in chunks))
    ]
    if not ordered:
        return torch.empty(0), torch.empty(0)
    both = torch.cat(ordered)
    return both[:, 0].contiguous(), both[:, 1].contiguous()


def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    world: World | None = None,
    call: ModelCall | None = None,
) -> dict[str, float]:
    """AUC and logloss of ``model`` on ``batches``: ``{"auc": ..., "logloss": ...}``; ``call`` as
    in :func:`predict`.

    With an active ``world`` the ranks share the work (:func:`predict_sharded`) and every rank
    gets the metrics of the whole of ``batches``: AUC is not an average of shard AUCs.
    """
    if world is not None and world.active:
        logits, labels = predict_sharded(model, batches, world, call)
    else:
        logits, labels = predict(model, batches, call)
    return {"auc": roc_auc(logits, labels), "logloss": logloss(logits, labels)}


def read_batches(batches: Iterable[Batch], count: int) -> Iterator[Batch | Exception]:
    """The first ``count`` of ``batches``; an error reading one is yielded, not raised, and ends
    the iteration.

    A streaming data set checks its cells as it reads them, so one rank may hit a bad row that the
    others never see; :func:`sync_batch` then makes every rank raise it at the same step rather
    than leave the others waiting in the step's all-reduce. A source that ends before ``count``
    batches yields an error too (ranks must run the same number of steps).
    """
    it = iter(batches)
    for i in range(count):
        try:
            batch = next(it)
        except StopIteration:
            yield AmtlError(
                f"the training data ended after {i} of the {count} batches the epoch needs; "
                "rerun, and report it if it happens again"
            )
            return
        except Exception as exc:  # raised by sync_batch, on every rank
            yield exc
            return
        yield batch


def sync_batch(item: Batch | Exception, world: World, stop: bool = False) -> bool:
    """Agree with the other ranks before a step; one small all-reduce under DDP.

    Args:
        item: this rank's next batch, or the error reading it (:func:`read_batches`).
        world: the ranks.
        stop: this rank wants to stop (its Ctrl-C flag).

    Returns:
        Whether any rank wants to stop: every rank then stops before the same step.

    Raises:
        The lowest failing rank's error, on every rank, if any rank failed to read its batch.
    """
    stop_any, failed_any = world.any_rank(stop, isinstance(item, Exception))
    if failed_any:
        with world.errors_agreed():
            if isinstance(item, Exception):
                raise item
    return stop_any


def bce_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    features: dict[str, torch.Tensor],
    labels: torch.Tensor,
    penalty: Callable[[], torch.Tensor] | None = None,
    world: World | None = None,
    call: ModelCall | None = None,
) -> float:
    """One optimiser step on the binary cross-entropy (plus ``penalty()``); returns the BCE.

    ``penalty``, if given, returns a scalar tensor added to the loss before ``backward`` (the
    memory budget's Lagrangian term, training/finetune.py). Under DDP (``model`` wrapped in
    DistributedDataParallel) ``backward`` averages the gradients over the ranks: each rank's
    batch is 1/W of the step's rows, and the penalty, identical on every rank, keeps its weight
    (its gradient is the same on every rank, so its average is itself).

    Args:
        features: column -> tensor of B rows (moved to the model's device here).
        labels: float (B,) in {0, 1}.
        world: the ranks of a data-parallel run; their losses are checked together, so either
            every rank takes the step or every rank raises.
        call: how to get logits from the model (:func:`logits_of`); for a model that returns
            probabilities the loss is their own binary cross-entropy.

    Returns:
        The BCE of this step's batch; with an active ``world`` the mean over the ranks.

    Raises:
        TrainingError: the loss is NaN or inf (on any rank). The step is not applied, so the
            model keeps its last good state.
    """
    optimizer.zero_grad(set_to_none=True)
    features, labels = _to(device_of(model), features, labels)
    logits = logits_of(model, features, call)
    loss = F.binary_cross_entropy_with_logits(logits, labels.float())
    total = loss if penalty is None else loss + penalty()
    observed = torch.stack([loss.detach(), total.detach()]).double()
    shared = world is not None and world.active
    if shared:
        # Before backward, the step's first collective: a rank that skipped backward would leave
        # the others waiting in DDP's gradient all-reduce.
        observed = world.all_reduce_(observed) / world.size
    if not torch.isfinite(observed[1]):
        error = TrainingError(
            f"the training loss became {float(observed[0])}; the last good state is kept - "
            "lower the learning rate (`lr` / `amtl_lr`) or check the data for extreme values"
        )
        raise mark_every_rank(error) if shared else error
    total.backward()
    try:
        optimizer.step()
    except RuntimeError as exc:
        if "overflow" not in str(exc):
            raise
        # Every rank holds the same weights and averaged gradients, so every rank gets here.
        error = TrainingError(
            "the optimiser step overflowed float32; the last good state is kept - lower the "
            "learning rate (`lr` / `amtl_lr`)"
        )
        raise (mark_every_rank(error) if shared else error) from None
    return float(observed[0])
