"""Check the CUDA paths on a machine with a GPU (not a test: the suite runs without one).

    python scripts/gpu_check.py                                        # lookup modules on cuda:0
    python -m torch.distributed.run --nproc_per_node=1 scripts/gpu_check.py   # + nccl and DDP

Needs torch with CUDA, numpy, safetensors and tqdm; the repository root on PYTHONPATH is enough
(no kernel build: on a GPU the modules use the pure-torch reference). Exits non-zero on the first
mismatch.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from amtl_compress.lookup import PackedEmbedding, PackedEmbeddingBag, pack_rows
from amtl_compress.training.distributed import World, process_group, wrap_ddp


def check_lookup(device: torch.device) -> None:
    """PackedEmbedding(Bag) moved to ``device`` == torch on the dense zero-tailed CPU table."""
    g = torch.Generator().manual_seed(0)
    n, d = 1000, 64
    lengths = torch.randint(1, d + 1, (n,), generator=g)
    dense = torch.where(torch.arange(d) < lengths[:, None], torch.randn(n, d, generator=g), 0.0)
    values, offsets = pack_rows(dense, lengths)
    ids = torch.randint(0, n, (4096,), generator=g)
    bag_offsets = torch.arange(0, 4096, 20)
    emb = PackedEmbedding(values, offsets, d, name="t").to(device)
    assert torch.equal(emb(ids.to(device)).cpu(), F.embedding(ids, dense)), "embedding"
    for mode in ("sum", "mean", "max"):
        bag = PackedEmbeddingBag(values, offsets, d, mode=mode).to(device)
        got = bag(ids.to(device), bag_offsets.to(device)).cpu()
        assert torch.equal(got, F.embedding_bag(ids, dense, bag_offsets, mode=mode)), mode
    assert {t.device for t in emb.state_dict().values()} == {device}, "state_dict device"
    try:
        emb(torch.tensor([n], device=device))
    except IndexError:
        pass
    else:
        raise AssertionError("an id outside [0, N) did not raise IndexError")
    print(f"lookup on {device}: embedding and bag sum/mean/max bitwise equal to CPU torch")


def ddp_step(world: World) -> float:
    model = torch.nn.Linear(4, 1).to(world.device)
    ddp = wrap_ddp(model, world)
    loss = ddp(torch.randn(8, 4, device=world.device)).pow(2).mean()
    loss.backward()
    return loss.item()


def main() -> None:
    print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: nothing to check")
    if int(os.environ.get("RANK", "0")) == 0:
        check_lookup(torch.device("cuda", 0))
    with process_group() as world:
        if world.active:
            total = world.all_reduce_(torch.tensor([1.0]))
            assert total.item() == world.size, total
            rows = world.gather_rows(torch.ones(world.rank + 2, 3))
            assert [r.shape[0] for r in rows] == [r + 2 for r in range(world.size)], rows
            world.check_same("a checksum", torch.arange(10))
            print(f"rank {world.rank}/{world.size} on {world.device}: collectives and a DDP step "
                  f"(loss {ddp_step(world):.4f}) ran")


if __name__ == "__main__":
    main()
