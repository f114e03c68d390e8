"""The GPU checks in one prepared script (not a test: the suite runs without a GPU).

    PYTHONUNBUFFERED=1 PYTHONPATH=. python3 scripts/gpu_check.py      # ~3-6 min on one H100
    PYTHONPATH=. python3 -m torch.distributed.run --nproc_per_node=1 scripts/gpu_check.py

In order, each step timed and reported, the next one run whatever the last gave:

1. ``lookup``: PackedEmbedding(Bag) on ``cuda:0`` (the Triton kernels) against torch on the CPU:
   float32 bitwise equal to ``F.embedding`` / ``F.embedding_bag`` on the dense zero-tailed table,
   float16 / bfloat16 / int8 / int4 bitwise equal to the same calls on the dequantised table,
   every mode, per-sample weights with and without ``padding_idx``, empty bags, D from 1 to 256;
   out-of-range ids an IndexError; the kernels actually used.
2. ``tests``: the CUDA tests of the suite (``-k cuda``; pytest), and ``eval --device cuda``.
3. ``bench``: ``bench/lookup.py --device cuda`` (the grid, N = 1M and 10M), then ``--dtype
   int8`` and ``--dtype int4`` at N = 1M while the time budget (``--budget-s``, default 420)
   lasts.

Under torch.distributed.run it checks instead the collectives and a DDP step, after a short
lookup check on rank 0 (docs/scaling.md).
Everything printed also goes to ``$OUT/gpu_check.txt`` and each bench run to
``$OUT/bench_<dtype>.txt`` when ``OUT`` is set. Needs torch with CUDA, Triton (CUDA builds of
torch ship it), numpy, safetensors, pyarrow, tqdm and pytest; the repository root on
PYTHONPATH is enough. Exits non-zero if any step failed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
OUT = Path(os.environ["OUT"]) if os.environ.get("OUT") else None
_log_lines: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    _log_lines.append(line)
    if OUT is not None:
        (OUT / "gpu_check.txt").write_text("\n".join(_log_lines) + "\n")


def check_lookup(device: torch.device) -> None:
    """Step 1: the CUDA modules == CPU torch on the dense (dequantised) table, bitwise."""
    sys.path.insert(0, str(REPO / "tests"))
    from lookup_helpers import assert_bitwise, dense_of, packed, random_table

    from amtl_compress.lookup import PackedEmbedding, PackedEmbeddingBag, triton_ops

    calls = {"embedding": 0, "bag": 0}
    real_emb, real_bag = triton_ops.packed_embedding_triton, triton_ops.packed_embedding_bag_triton

    def count_emb(*args, **kwargs):
        calls["embedding"] += 1
        return real_emb(*args, **kwargs)

    def count_bag(*args, **kwargs):
        calls["bag"] += 1
        return real_bag(*args, **kwargs)

    triton_ops.packed_embedding_triton, triton_ops.packed_embedding_bag_triton = (
        count_emb, count_bag)
    cases = [("sum", False, None), ("mean", False, None), ("max", False, None),
             ("sum", True, None), ("sum", True, 3), ("mean", False, 3), ("max", False, 3)]
    dtypes = (torch.float32, torch.float16, torch.bfloat16, torch.int8, torch.uint8)
    g = torch.Generator().manual_seed(0)
    checked = 0
    try:
        for dtype in dtypes:
            for d in (1, 7, 16, 33, 64, 128, 129, 256):
                n = 1000
                weight, lengths = random_table(n, d, seed=d, specials=dtype == torch.float32,
                                               min_length=0)
                values, offsets, scale, bias = packed(weight, lengths, dtype, seed=d)
                dense = dense_of(values, offsets, d, scale, bias)
                emb = PackedEmbedding(values, offsets, d, scale=scale, bias=bias,
                                      name="t").to(device)
                for count in (1, 4096):
                    ids = torch.randint(0, n, (count,), generator=g)
                    for index_dtype in (torch.int64, torch.int32):
                        got = emb(ids.to(device, index_dtype)).cpu()
                        assert_bitwise(got, F.embedding(ids, dense))
                        checked += 1
                sizes = torch.randint(0, 41, (300,), generator=g)
                sizes[:3] = torch.tensor([0, 1, 0])
                bag_offsets = torch.cat([torch.zeros(1, dtype=torch.int64), sizes.cumsum(0)])
                ids = torch.randint(0, n, (int(bag_offsets[-1]),), generator=g)
                ids[::7] = 3
                for mode, weighted, padding_idx in cases:
                    for include_last in (False, True):
                        bo = bag_offsets if include_last else bag_offsets[:-1]
                        w = torch.randn(ids.numel(), generator=g) if weighted else None
                        bag = PackedEmbeddingBag(values, offsets, d, scale=scale, bias=bias,
                                                 mode=mode, padding_idx=padding_idx,
                                                 include_last_offset=include_last).to(device)
                        got = bag(ids.to(device), bo.to(device),
                                  None if w is None else w.to(device)).cpu()
                        expected = F.embedding_bag(ids, dense, bo, mode=mode,
                                                   per_sample_weights=w, padding_idx=padding_idx,
                                                   include_last_offset=include_last)
                        assert_bitwise(got, expected)
                        checked += 1
            label = "int4" if dtype == torch.uint8 else str(dtype).removeprefix("torch.")
            say(f"  {label:>9}: embedding and bags bitwise equal to CPU torch")
        try:
            emb(torch.tensor([n], device=device))
        except IndexError as exc:
            say(f"  an id outside [0, N): IndexError({exc})")
        else:
            raise AssertionError("an id outside [0, N) did not raise IndexError")
    finally:
        triton_ops.packed_embedding_triton, triton_ops.packed_embedding_bag_triton = (
            real_emb, real_bag)
    assert calls["embedding"] > 0 and calls["bag"] > 0, f"the Triton kernels were not used: {calls}"
    say(f"  {checked} comparisons, Triton calls: {calls}")


def brief_lookup_check(device: torch.device) -> None:
    """One table, float32: PackedEmbedding(Bag) on ``device`` == torch on the dense CPU table."""
    from amtl_compress.lookup import PackedEmbedding, PackedEmbeddingBag, pack_rows

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
    print(f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}")
    print(f"lookup on {device}: embedding and bag sum/mean/max bitwise equal to CPU torch")


def run_step(label: str, command: list[str], timeout: float, capture: str | None = None) -> bool:
    """Run ``command`` (cwd: the repository), print its output; True if it exited 0."""
    say(f"$ {' '.join(command)}")
    try:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                              timeout=max(timeout, 1.0),
                              env={**os.environ, "PYTHONPATH": str(REPO)})
        output, ok = done.stdout + done.stderr, done.returncode == 0
    except subprocess.TimeoutExpired as exc:  # its captured output comes as bytes
        partial = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else ""
        output, ok = partial + f"\n{label}: stopped after {timeout:.0f} s", False
    for line in output.rstrip().splitlines():
        say(f"  {line}")
    if capture and OUT is not None:
        (OUT / capture).write_text(output)
    return ok


def ddp_check() -> None:
    from amtl_compress.training.distributed import World, process_group, wrap_ddp

    def ddp_step(world: World) -> float:
        model = torch.nn.Linear(4, 1).to(world.device)
        ddp = wrap_ddp(model, world)
        loss = ddp(torch.randn(8, 4, device=world.device)).pow(2).mean()
        loss.backward()
        return loss.item()

    with process_group() as world:
        if world.active:
            total = world.all_reduce_(torch.tensor([1.0]))
            assert total.item() == world.size, total
            rows = world.gather_rows(torch.ones(world.rank + 2, 3))
            assert [r.shape[0] for r in rows] == [r + 2 for r in range(world.size)], rows
            world.check_same("a checksum", torch.arange(10))
            print(f"rank {world.rank}/{world.size} on {world.device}: collectives and a DDP step "
                  f"(loss {ddp_step(world):.4f}) ran")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="seconds the whole script may take; later bench runs are skipped "
                             "when it is spent")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(f"gpu_check: no CUDA device (torch {torch.__version__}); run it on a "
                         "machine with a GPU")
    if "RANK" in os.environ:  # started by torch.distributed.run
        if int(os.environ["RANK"]) == 0:
            brief_lookup_check(torch.device("cuda", 0))
        ddp_check()
        return
    if OUT is not None:
        OUT.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    try:
        import triton
        triton_version = triton.__version__
    except Exception as exc:  # reported; step 1 then shows the fallback
        triton_version = f"not importable ({exc})"
    say(f"torch {torch.__version__}, triton {triton_version}, python "
        f"{sys.version.split()[0]}, {torch.cuda.get_device_name(0)}")
    results: dict[str, bool] = {}

    say("\n[1] lookup: CUDA modules against CPU torch")
    t0 = time.monotonic()
    try:
        check_lookup(torch.device("cuda", 0))
        results["lookup"] = True
    except Exception:
        for line in traceback.format_exc().rstrip().splitlines():
            say(f"  {line}")
        results["lookup"] = False
    say(f"  ({time.monotonic() - t0:.0f} s)")

    say("\n[2] tests: the suite's CUDA tests")
    t0 = time.monotonic()
    results["tests"] = run_step("tests", [
        sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
        "cuda or pack_and_eval", "tests/test_lookup_triton.py", "tests/test_lookup_load.py",
        "tests/test_cli.py"], timeout=180)
    say(f"  ({time.monotonic() - t0:.0f} s)")

    say("\n[3] bench: bench/lookup.py --device cuda")
    runs = [("float32", []), ("int8", ["--dtype", "int8", "--rows", "1000000"]),
            ("int4", ["--dtype", "int4", "--rows", "1000000"])]
    for dtype, extra in runs:
        left = args.budget_s - (time.monotonic() - began)
        if left < 60:
            say(f"  --dtype {dtype}: skipped, {left:.0f} s of the budget left")
            continue
        t0 = time.monotonic()
        results[f"bench {dtype}"] = run_step(
            f"bench {dtype}", [sys.executable, "bench/lookup.py", "--device", "cuda", *extra],
            timeout=left - 10, capture=f"bench_{dtype}.txt")
        say(f"  ({time.monotonic() - t0:.0f} s)")

    say(f"\nsummary ({time.monotonic() - began:.0f} s): "
        + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in results.items()))
    if not all(results.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
