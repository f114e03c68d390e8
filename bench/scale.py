"""Scale benchmark: a table larger than a comfortable working set, and how the costs grow.

1. Builds a run directory with one float32 table of at least 8 GB (default 2^24 x 128 = 8.6 GB),
   written chunk by chunk (the table never sits in memory), whose kept lengths follow a Zipf
   frequency rank (frequent rows keep more; mean ~37 % of D), and times a plain copy of the same
   bytes (``shutil.copyfile`` + fsync) as the yardstick for packing.
2. Packs it (float32, int8), each in a fresh child process: time, MB/s of source, the ratio of
   pack to copy throughput (target >= 0.40) and the child's peak RSS (VmHWM, target < 1.5 GB).
3. Serves Zipf-distributed lookups from each memory-mapped packed file in a fresh child:
   lookups/s of a first pass (rows faulted in from disk) and of a second over the same ids
   (resident), peak RSS, and RssAnon / RssFile at the end (touched pages of the mapping count
   in RSS as RssFile; they are clean page cache the kernel can drop).
4. Cost growth over at least three sizes: ``pack`` time over N rows, ``count_frequencies`` time over
   data rows (Parquet), and the AMTL overhead per training step (AMTL step / plain step, DLRM,
   batches of B = 4096, same batches, interleaved; the paper's Table 5 reports 1.09x, target
   <= 1.10x).

    .venv/bin/python bench/scale.py              # everything: 10-20 min on 2 cores, 18 GB disk
    .venv/bin/python bench/scale.py --rows 1000000 --growth-rows 100000,200000,400000 \\
        --amtl-rows 20000,40000,80000 --amtl-steps 8      # a quick smoke run

Page cache: before the copy and before every pack the source is flushed and evicted from the
page cache (``posix_fadvise(DONTNEED)``), and so is each packed file before its lookups, so every
measurement starts by reading from the disk; ``--warm`` skips the eviction. Not a test and not
imported by the package.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

MODEL_MODULE = """
from torch import nn


class Big(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding({rows}, {dim})
        self.head = nn.Linear({dim}, 1)


def build():
    return Big()
"""
TABLE = "emb"
MB = 1e6


# --------------------------------------------------------------------------- measurement helpers


def status_kib() -> dict[str, int]:
    """``/proc/self/status`` memory fields in KiB: VmRSS, VmHWM (peak), RssAnon, RssFile."""
    keys = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")
    out: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in keys:
            out[key] = int(rest.split()[0])
    return out


def evict(path: Path) -> None:
    """Flush ``path`` and drop its pages from the page cache, so the next read hits the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_child(args: list[str]) -> dict[str, Any]:
    """Run this file as ``--child ...`` in a fresh interpreter; return its last stdout line."""
    result = subprocess.run(
        [sys.executable, __file__, "--child", *args], capture_output=True, text=True
    )
    if result.returncode:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"child {args[0]} failed with exit code {result.returncode}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def table(rows: list[list[str]]) -> str:
    """``rows`` (header first) as an aligned plain-text table."""
    from amtl_compress._text import format_table

    return format_table(rows)


def load() -> str:
    """The 1-minute load average: other processes on the machine skew every timing."""
    return f"{os.getloadavg()[0]:.1f}"


def growth(values: list[float], i: int) -> str:
    """``values[i] / values[i - 1]`` as ``1.23x``; empty for the first size."""
    return "" if i == 0 else f"{values[i] / values[i - 1]:.2f}x"


# --------------------------------------------------------------------------- synthetic data


def zipf_cdf(n: int, exponent: float) -> np.ndarray:
    """(n,) float64 CDF over frequency ranks 0..n-1 with P(rank r) proportional to (r+1)^-s."""
    cdf = np.cumsum(np.arange(1, n + 1, dtype=np.float64) ** -exponent)
    cdf /= cdf[-1]
    return cdf


def zipf_ranks(cdf: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """(count,) int64 frequency ranks drawn from ``cdf``."""
    ranks = np.searchsorted(cdf, rng.random(count), side="right")
    return np.minimum(ranks, cdf.size - 1).astype(np.int64)


def rank_lengths(rows: int, dim: int, perm: np.ndarray) -> np.ndarray:
    """(N,) int64 kept lengths tied to frequency rank; row ``perm[r]`` has rank r.

    With u = r / N, L = ceil(D * (1 - u) ** 1.7): the most frequent rows keep all D values, the
    rarest 1, mean ~ D / 2.7 = 0.37 D (as bench/pack.py).
    """
    u = np.arange(rows, dtype=np.float64) / rows
    by_rank = np.clip(np.ceil(dim * (1.0 - u) ** 1.7), 1, dim).astype(np.int64)
    lengths = np.empty(rows, dtype=np.int64)
    lengths[perm] = by_rank
    return lengths


def build_run_dir(run: Path, rows: int, dim: int, seed: int) -> np.ndarray:
    """A run directory as ``finetune`` writes it, streamed; returns the rank -> row permutation.

    ``model.safetensors`` holds ``emb.weight`` (N, D) float32 with every tail past its length
    zeroed (as after detach) and a small ``head``; ``lengths.safetensors`` the lengths.
    """
    import torch

    from amtl_compress._io import atomic_save_safetensors
    from amtl_compress.storage.header import encode_header

    rng = np.random.default_rng(seed)
    perm = rng.permutation(rows)
    lengths = rank_lengths(rows, dim, perm)
    run.mkdir(parents=True)
    (run / "bench_scale_model.py").write_text(MODEL_MODULE.format(rows=rows, dim=dim))
    spec = json.dumps({"kind": "factory", "factory": "bench_scale_model:build"})
    atomic_save_safetensors({TABLE: torch.from_numpy(lengths)}, run / "lengths.safetensors")
    prefix, _ = encode_header(
        [(f"{TABLE}.weight", "F32", (rows, dim)), ("head.bias", "F32", (1,)),
         ("head.weight", "F32", (1, dim))],
        {"amtl_compress.model": spec},
    )
    columns = np.arange(dim)
    chunk = max(1, (64 << 20) // (dim * 4))
    with open(run / "model.safetensors", "wb") as f:
        f.write(prefix)
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            block = rng.standard_normal((stop - start, dim), dtype=np.float32)
            block *= np.float32(0.05)
            block[columns >= lengths[start:stop, None]] = 0.0  # tails zeroed, as after detach
            f.write(block)
        f.write(np.zeros(1, dtype=np.float32))
        f.write(rng.standard_normal(dim, dtype=np.float32))
    return perm


def timed_copy(source: Path, work: Path) -> float:
    """Seconds to ``shutil.copyfile`` ``source`` and fsync the copy (the copy is then deleted)."""
    target = work / "copy.tmp"
    start = time.perf_counter()
    shutil.copyfile(source, target)
    fd = os.open(target, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)
    elapsed = time.perf_counter() - start
    target.unlink()
    return elapsed


# --------------------------------------------------------------------------- children


def child_pack(run: str, out: str, dtype: str) -> dict[str, Any]:
    """Pack once (fresh process, so nothing of the parent counts towards the peak)."""
    sys.path.insert(0, run)  # the model factory of the spec lives in the run directory
    from amtl_compress.storage.pack import pack

    base = status_kib()
    start = time.perf_counter()
    report = pack(run, out, dtype=dtype, progress=False)
    elapsed = time.perf_counter() - start
    return {
        "seconds": elapsed, "base": base, "end": status_kib(),
        "bytes_after": report.bytes_after, "avg_kept": report.tables[0].avg_kept,
    }


def child_lookup(path: str, ids_file: str, batch: int, warmup: int) -> dict[str, Any]:
    """Serve lookups from a memory-mapped packed table: load, warm up, time the batches."""
    import torch

    from amtl_compress.lookup.modules import PackedEmbedding
    from amtl_compress.storage.format import read_packed_table

    ids = torch.from_numpy(np.load(ids_file)).reshape(-1, batch)
    base = status_kib()
    start = time.perf_counter()
    t = read_packed_table(path, mmap=True)
    module = PackedEmbedding(t.values, t.offsets, t.embedding_dim, t.scale, t.bias, t.field)
    with torch.inference_mode():
        module(ids[0])  # builds/loads the kernel and derives the int32 offsets
        load_seconds = time.perf_counter() - start
        loaded = status_kib()
        for b in ids[:warmup]:
            module(b)
        timed = ids[warmup:]
        seconds = []
        for _ in range(2):  # first pass faults the rows in, the second finds them resident
            start = time.perf_counter()
            for b in timed:
                module(b)
            seconds.append(time.perf_counter() - start)
    return {
        "load_seconds": load_seconds, "seconds": seconds, "lookups": timed.numel(),
        "base": base, "loaded": loaded, "end": status_kib(),
    }


# --------------------------------------------------------------------------- parts


def part_pack(args: argparse.Namespace, work: Path, run: Path, copy_s: float) -> dict[str, float]:
    source = run / "model.safetensors"
    source_mb = args.rows * args.dim * 4 / MB
    rows = [["dtype", "time s", "MB/s src", "vs copy", "packed MB", "ratio", "RSS base MiB",
             "RSS peak MiB"]]
    seconds: dict[str, float] = {}
    for dtype in args.dtypes.split(","):
        if not args.warm:
            evict(source)
        m = run_child(["pack", str(run), str(work / f"packed_{dtype}"), dtype])
        seconds[dtype] = m["seconds"]
        rows.append([
            dtype, f"{m['seconds']:.1f}", f"{source_mb / m['seconds']:.0f}",
            f"{copy_s / m['seconds']:.2f}", f"{m['bytes_after'] / MB:,.0f}",
            f"{m['bytes_after'] / (source_mb * MB):.1%}", f"{m['base']['VmRSS'] / 1024:.0f}",
            f"{m['end']['VmHWM'] / 1024:.0f}",
        ])
    print(f"copy: {copy_s:.1f} s = {source_mb / copy_s:,.0f} MB/s (shutil.copyfile + fsync); "
          f"load average {load()}")
    print(table(rows))
    return seconds


def part_lookup(args: argparse.Namespace, work: Path, perm: np.ndarray) -> None:
    rng = np.random.default_rng(args.seed + 1)
    cdf = zipf_cdf(args.rows, args.zipf)
    count = (args.lookup_batches + args.lookup_warmup) * args.lookup_batch
    ids = perm[zipf_ranks(cdf, count, rng)]
    del cdf
    ids_file = work / "ids.npy"
    np.save(ids_file, ids)
    distinct = np.unique(ids[args.lookup_warmup * args.lookup_batch:]).size
    print(f"lookups: {args.lookup_batches} batches of {args.lookup_batch:,} Zipf(s={args.zipf}) "
          f"ids after {args.lookup_warmup} warm-up batches, timed twice (1st: rows faulted in, "
          f"2nd: resident); {distinct:,} distinct rows ({distinct / args.rows:.2%} of N)")
    rows = [["dtype", "load s", "lookups/s 1st", "lookups/s 2nd", "RSS base MiB",
             "after load MiB", "RssAnon MiB", "RssFile MiB", "table MiB", "RSS peak MiB"]]
    for dtype in args.dtypes.split(","):
        packed = work / f"packed_{dtype}"
        manifest = json.loads((packed / "manifest.json").read_text())
        file = packed / manifest["tables"][TABLE]["file"]
        if not args.warm:
            evict(file)
        m = run_child(["lookup", str(file), str(ids_file), str(args.lookup_batch),
                       str(args.lookup_warmup)])
        rows.append([
            dtype, f"{m['load_seconds']:.1f}", f"{m['lookups'] / m['seconds'][0]:,.0f}",
            f"{m['lookups'] / m['seconds'][1]:,.0f}",
            f"{m['base']['VmRSS'] / 1024:.0f}", f"{m['loaded']['VmRSS'] / 1024:.0f}",
            f"{m['end']['RssAnon'] / 1024:.0f}", f"{m['end']['RssFile'] / 1024:.0f}",
            f"{(m['end']['RssFile'] - m['base']['RssFile']) / 1024:.0f}",
            f"{m['end']['VmHWM'] / 1024:.0f}",
        ])
    print(table(rows))


def part_pack_growth(args: argparse.Namespace, work: Path, big_seconds: float | None) -> None:
    rows = [["N", "source MB", "pack s", "us/row", "MB/s src", "growth"]]
    times: list[float] = []
    sizes = [int(s) for s in args.growth_rows.split(",")]
    for n in sizes:
        if n == args.rows and big_seconds is not None:
            seconds = big_seconds  # the float32 pack of the big table measured above
        else:
            run = work / f"run_{n}"
            build_run_dir(run, n, args.dim, args.seed)
            if not args.warm:
                evict(run / "model.safetensors")
            seconds = run_child(["pack", str(run), str(work / f"packed_{n}"), "float32"])[
                "seconds"]
            shutil.rmtree(run)
            shutil.rmtree(work / f"packed_{n}")
        times.append(seconds)
        mb = n * args.dim * 4 / MB
        rows.append([f"{n:,}", f"{mb:,.0f}", f"{seconds:.2f}", f"{seconds / n * 1e6:.2f}",
                     f"{mb / seconds:.0f}", growth(times, len(times) - 1)])
    print(f"pack float32 (D = {args.dim}, child process, cold source; load average {load()})")
    print(table(rows))


def part_count_growth(args: argparse.Namespace, work: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from amtl_compress.data.counts import count_frequencies

    rng = np.random.default_rng(args.seed + 2)
    vocab = args.count_vocab
    cdf = zipf_cdf(vocab, args.zipf)
    perm = rng.permutation(vocab)
    rows = [["data rows", "file MB", "count s", "ns/row", "growth"]]
    times: list[float] = []
    for n in [int(s) for s in args.count_rows.split(",")]:
        path = work / f"data_{n}.parquet"
        with pq.ParquetWriter(path, pa.schema([("item", pa.int64()), ("label", pa.int8())])) as w:
            for start in range(0, n, 1 << 20):
                size = min(1 << 20, n - start)
                w.write_table(pa.table({
                    "item": perm[zipf_ranks(cdf, size, rng)],
                    "label": rng.integers(0, 2, size, dtype=np.int8),
                }))
        best = float("inf")
        for _ in range(2):  # best of two: the machine is shared
            start = time.perf_counter()
            counts = count_frequencies(path, "item", vocab)
            best = min(best, time.perf_counter() - start)
        if int(counts.sum()) != n:
            raise SystemExit(f"count_frequencies counted {int(counts.sum())} ids in {n} rows")
        times.append(best)
        rows.append([f"{n:,}", f"{path.stat().st_size / MB:,.0f}", f"{best:.2f}",
                     f"{best / n * 1e9:.0f}", growth(times, len(times) - 1)])
        path.unlink()
    print(f"count_frequencies (Parquet, column of Zipf ids, N = {vocab:,}, best of 2; load "
          f"average {load()})")
    print(table(rows))


def part_amtl_growth(args: argparse.Namespace) -> None:
    import torch

    load_before = load()
    rows = [["N", "U", "plain ms", "AMTL ms", "ratio", "budget ms", "us/row plain", "growth AMTL",
             "growth ratio"]]
    ratios: list[float] = []
    amtl_ms: list[float] = []
    for n in [int(s) for s in args.amtl_rows.split(",")]:
        m = amtl_overhead(n, args)
        ratios.append(m["amtl"] / m["plain"])
        amtl_ms.append(m["amtl"] * 1e3)
        rows.append([
            f"{n:,}", f"{m['distinct']:,}", f"{m['plain'] * 1e3:.1f}", f"{m['amtl'] * 1e3:.1f}",
            f"{ratios[-1]:.3f}", f"{m['budget'] * 1e3:.1f}", f"{m['plain'] / n * 1e6:.4f}",
            growth(amtl_ms, len(amtl_ms) - 1), growth(ratios, len(ratios) - 1),
        ])
    print(f"AMTL step overhead (DLRM, tables `big` N x {args.amtl_dim} and `small` "
          f"{SMALL_ROWS:,} x {args.amtl_dim}, B = {args.batch:,}, budget 0.4, ordering pca, "
          f"Adam; median of {args.amtl_steps} interleaved steps; torch threads "
          f"{torch.get_num_threads()}; load average before {load_before})")
    print(table(rows))


#: Rows of the DLRM's second table (the interaction needs two vectors besides the dense one).
SMALL_ROWS = 10_000


def amtl_overhead(n: int, args: argparse.Namespace) -> dict[str, float]:
    """Median seconds per training step of a DLRM with and without AMTL, on the same batches.

    Both models start from the same weights. The AMTL step is what ``finetune`` does per step:
    ``bce_step`` with the budget's penalty term, then ``apply_budget_``. Steps alternate between
    the two models (plain first on even steps, AMTL first on odd ones) so that load from other
    processes hits both alike.
    """
    import copy

    import torch

    from amtl_compress.core.amtl import AMTLConfig
    from amtl_compress.core.budget import apply_budget_
    from amtl_compress.models.dlrm import DLRM, DLRMConfig
    from amtl_compress.surgery.attach import (
        amtl_layers,
        amtl_parameters,
        attach_amtl_,
        model_parameters,
    )
    from amtl_compress.training.loop import bce_step

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed + 3)
    d, batch = args.amtl_dim, args.batch
    dense = ("d0", "d1", "d2", "d3")
    config = DLRMConfig(
        categorical={"big": n, "small": SMALL_ROWS}, dense=dense, embedding_dim=d,
        bottom_mlp=(32, d), top_mlp=(64, 32),
    )
    plain = DLRM(config)
    model = copy.deepcopy(plain)

    # Training data of args.data_factor * N rows: its counts feed AMTL, batches come from the
    # same Zipf distribution (frequent ids placed at random rows).
    cdf = zipf_cdf(n, args.zipf)
    perm = rng.permutation(n)
    total = args.data_factor * n
    probs = np.diff(cdf, prepend=0.0)
    counts_big = np.empty(n, dtype=np.int64)
    counts_big[perm] = rng.multinomial(total, probs)
    del probs
    counts_small = rng.multinomial(total, np.full(SMALL_ROWS, 1 / SMALL_ROWS))
    steps = args.amtl_steps + 2  # 2 warm-up steps each
    batches = []
    for _ in range(steps):
        features = {name: torch.randn(batch) for name in dense}
        features["big"] = torch.from_numpy(perm[zipf_ranks(cdf, batch, rng)])
        features["small"] = torch.from_numpy(rng.integers(0, SMALL_ROWS, batch))
        batches.append((features, torch.from_numpy(rng.integers(0, 2, batch)).float()))
    del cdf, perm

    attach_amtl_(
        model,
        {"embeddings.big": torch.from_numpy(counts_big),
         "embeddings.small": torch.from_numpy(counts_small)},
        AMTLConfig(ordering="pca"),
    )
    layers = amtl_layers(model)
    plain_opt = torch.optim.Adam(plain.parameters(), lr=1e-2)
    amtl_opt = torch.optim.Adam([
        {"params": model_parameters(model), "lr": 1e-2},
        {"params": amtl_parameters(model), "lr": 3e-3},
    ])
    target = 0.4
    apply_budget_(layers, target)

    def penalty() -> torch.Tensor:
        return sum(layer.price * layer.expected_ratio() for layer in layers.values())

    def plain_step(features: dict[str, torch.Tensor], labels: torch.Tensor) -> float:
        start = time.perf_counter()
        bce_step(plain, plain_opt, features, labels)
        return time.perf_counter() - start

    budget_times: list[float] = []

    def amtl_step(features: dict[str, torch.Tensor], labels: torch.Tensor) -> float:
        start = time.perf_counter()
        bce_step(model, amtl_opt, features, labels, penalty)
        mid = time.perf_counter()
        apply_budget_(layers, target)
        end = time.perf_counter()
        budget_times.append(end - mid)
        return end - start

    plain.train()
    model.train()
    plain_times: list[float] = []
    amtl_times: list[float] = []
    for i, (features, labels) in enumerate(batches):
        if i % 2 == 0:
            p, a = plain_step(features, labels), amtl_step(features, labels)
        else:
            a, p = amtl_step(features, labels), plain_step(features, labels)
        if i >= 2:
            plain_times.append(p)
            amtl_times.append(a)
    return {
        "plain": statistics.median(plain_times),
        "amtl": statistics.median(amtl_times),
        "budget": statistics.median(budget_times[2:]),
        "distinct": layers["embeddings.big"].num_frequencies,
    }


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=1 << 24, help="N of the big table")
    p.add_argument("--dim", type=int, default=128, help="D of the big table")
    p.add_argument("--dtypes", default="float32,int8", help="packed dtypes to measure")
    p.add_argument("--zipf", type=float, default=1.05, help="Zipf exponent of ids")
    p.add_argument("--lookup-batches", type=int, default=200)
    p.add_argument("--lookup-batch", type=int, default=4096)
    p.add_argument("--lookup-warmup", type=int, default=10)
    p.add_argument("--growth-rows", default=f"{1 << 20},{1 << 22},{1 << 24}",
                   help="N for pack growth (the big table's N reuses its float32 pack)")
    p.add_argument("--count-rows", default="1000000,4000000,16000000",
                   help="data rows for count_frequencies growth")
    p.add_argument("--count-vocab", type=int, default=1_000_000, help="N of the counted column")
    p.add_argument("--amtl-rows", default="100000,1000000,4000000,16000000",
                   help="N of the DLRM's AMTL table for the step overhead")
    p.add_argument("--amtl-dim", type=int, default=16)
    p.add_argument("--amtl-steps", type=int, default=20, help="timed steps per model and size")
    p.add_argument("--batch", type=int, default=4096, help="B of a training step")
    p.add_argument("--data-factor", type=int, default=4,
                   help="training rows per table row whose counts feed AMTL")
    p.add_argument("--parts", default="pack,lookup,growth,count,amtl",
                   help="comma-separated subset of pack,lookup,growth,count,amtl")
    p.add_argument("--warm", action="store_true", help="do not evict files from the page cache")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads for the AMTL steps (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tmpdir", default=None, help="where the ~18 GB of files go")
    p.add_argument("--keep", action="store_true", help="keep the work directory (debugging)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    return p.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        kind, rest = args.child[0], args.child[1:]
        if kind == "pack":
            out = child_pack(*rest)
        else:
            out = child_lookup(rest[0], rest[1], int(rest[2]), int(rest[3]))
        print(json.dumps(out))
        return

    import torch

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    parts = set(args.parts.split(","))
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, torch threads "
          f"{torch.get_num_threads()}, page cache {'warm' if args.warm else 'evicted'}, "
          f"load average {load()}")
    work = Path(tempfile.mkdtemp(prefix="amtl-bench-scale-", dir=args.tmpdir))
    try:
        big_seconds = None
        if parts & {"pack", "lookup"}:
            run = work / "run"
            start = time.perf_counter()
            perm = build_run_dir(run, args.rows, args.dim, args.seed)
            os.sync()
            size = (run / "model.safetensors").stat().st_size
            print(f"source: {args.rows:,} x {args.dim} float32 = {size / MB:,.0f} MB on disk "
                  f"(built in {time.perf_counter() - start:.0f} s); RAM "
                  f"{os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 1e9:.0f} GB")
            if not args.warm:
                evict(run / "model.safetensors")
            copy_s = timed_copy(run / "model.safetensors", work)
            seconds = part_pack(args, work, run, copy_s)
            big_seconds = seconds.get("float32")
            shutil.rmtree(run)
            if "lookup" in parts:
                part_lookup(args, work, perm)
            del perm
            for packed in work.glob("packed_*"):
                shutil.rmtree(packed)
        if "growth" in parts:
            part_pack_growth(args, work, big_seconds)
        if "count" in parts:
            part_count_growth(args, work)
        if "amtl" in parts:
            part_amtl_growth(args)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
