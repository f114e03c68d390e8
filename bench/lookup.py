"""Time PackedEmbedding(Bag) against nn.Embedding(Bag) on the same ids (not a test).

For each cell (D, B, id distribution, threads) the timed calls of ours and of the baseline are
interleaved (alternating which goes first) and the ratio is median(ours) / median(baseline),
so < 1 means the packed lookup is faster. The table has N rows whose kept lengths are tied to
frequency (frequent rows keep more; mean about 37 % of D), as after AMTL fine-tuning.

    .venv/bin/python bench/lookup.py            # the full grid (N = 1M, ~10 s on 2 idle cores)
    .venv/bin/python bench/lookup.py --quick    # a small grid for a smoke run
    .venv/bin/python bench/lookup.py --ns-per-id  # ns per id of the bag op, per values dtype
    .venv/bin/python bench/lookup.py --dtype int4   # the grid with int4 values (torch: float32)
    .venv/bin/python bench/lookup.py --placement  # the same hot ids, consecutive or scattered
    .venv/bin/python bench/lookup.py --round-lengths 16  # every float32 row on a 64-byte line
    python bench/lookup.py --device cuda          # the grid on a GPU: Triton kernels vs torch there
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import time
from collections.abc import Iterator
from functools import partial

import torch
from torch import Tensor, nn

from amtl_compress.lookup import PackedEmbedding, PackedEmbeddingBag, pack_rows
from amtl_compress.lookup.ops import load_kernel

BAG_LEN = 20
ZIPF_A = 1.1
# With u = rank / N, L = ceil(D * (1 - u**GAMMA)) has mean D * GAMMA / (GAMMA + 1) = 0.37 D.
GAMMA = 0.37 / 0.63


def make_table(n: int, d: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """(dense (N, D), zero tails; rank_to_row (N,); lengths (N,)); rank 0 is the most frequent."""
    device = gen.device  # a CUDA generator builds the table on the GPU
    rank_to_row = torch.randperm(n, generator=gen, device=device)
    u = (torch.arange(n, dtype=torch.float64, device=device) + 0.5) / n
    by_rank = torch.ceil(d * (1 - u**GAMMA)).clamp(1, d).to(torch.int64)
    lengths = torch.empty(n, dtype=torch.int64, device=device)
    lengths[rank_to_row] = by_rank
    dense = torch.randn(n, d, generator=gen, device=device)
    dense = torch.where(torch.arange(d, device=device) < lengths[:, None], dense, 0.0)
    return dense, rank_to_row, lengths


def sample_ids(dist: str, count: int, rank_to_row: Tensor, gen: torch.Generator) -> Tensor:
    n, device = rank_to_row.numel(), gen.device
    if dist == "uniform":
        return torch.randint(0, n, (count,), generator=gen, device=device)
    cdf = torch.cumsum(torch.arange(1, n + 1, dtype=torch.float64, device=device) ** -ZIPF_A, 0)
    ranks = torch.searchsorted(cdf, torch.rand(count, generator=gen, dtype=torch.float64,
                                               device=device) * cdf[-1]).clamp(max=n - 1)
    return rank_to_row[ranks]


def time_pair(ours, base, repeats: int) -> tuple[float, float]:
    """(median(ours) / median(base), median(base) in us per call), calls interleaved; each sample
    times a block of calls."""
    for fn in (ours, base):
        fn()
    start = time.perf_counter()
    base()
    once = max(time.perf_counter() - start, 1e-7)
    block = max(1, min(1000, int(2e-3 / once)))  # ~2 ms per sample to beat timer noise
    t_ours, t_base = [], []
    for r in range(repeats):
        order = ((ours, t_ours), (base, t_base)) if r % 2 == 0 else ((base, t_base), (ours, t_ours))
        for fn, sink in order:
            start = time.perf_counter()
            for _ in range(block):
                fn()
            sink.append(time.perf_counter() - start)
    base_median = statistics.median(t_base)
    return statistics.median(t_ours) / base_median, 1e6 * base_median / block


def bench_dim(n: int, d: int, batches: tuple[int, ...], dtype: str, repeats: int,
              gen: torch.Generator, thread_counts: tuple[int, ...] = (1, 2), round_to: int = 1
              ) -> Iterator[tuple[float, float]]:
    """Print one row per (distribution, B, threads) for embedding dim ``d``; yield the ratios.

    ``round_to`` > 1 packs every row with its length rounded up to a multiple of it (at most D):
    the extra values are the row's zero tail, so outputs do not change, only where rows start.
    """
    dense, rank_to_row, lengths = make_table(n, d, gen)
    if round_to > 1:
        lengths = ((lengths + round_to - 1) // round_to * round_to).clamp(max=d)
    values, offsets, scale, bias = packed_values(dense, lengths, dtype)
    emb = nn.Embedding.from_pretrained(dense)
    bag = nn.EmbeddingBag.from_pretrained(dense, mode="sum")
    packed = PackedEmbedding(values, offsets, d, scale=scale, bias=bias)
    packed_bag = PackedEmbeddingBag(values, offsets, d, scale=scale, bias=bias, mode="sum")
    kept = 100 * int(offsets[-1]) / (n * d)  # kept values, % of the dense table
    for dist in ("uniform", "zipf"):
        for b in batches:
            ids = sample_ids(dist, b, rank_to_row, gen)
            bag_ids = sample_ids(dist, b * BAG_LEN, rank_to_row, gen)
            bag_offsets = torch.arange(b) * BAG_LEN
            for threads in thread_counts:
                torch.set_num_threads(threads)
                r_emb, us_emb = time_pair(partial(packed, ids), partial(emb, ids), repeats)
                r_bag, us_bag = time_pair(partial(packed_bag, bag_ids, bag_offsets),
                                          partial(bag, bag_ids, bag_offsets), repeats)
                print(f"{d:>4} {b:>6} {dist:>8} {threads:>3} {kept:>6.1f} {r_emb:>10.3f} "
                      f"{us_emb:>9.1f} {r_bag:>9.3f} {us_bag:>9.1f}", flush=True)
                yield r_emb, r_bag


def packed_values(dense: Tensor, lengths: Tensor, dtype: str
                  ) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(values, offsets, scale, bias) of a zero-tailed dense table kept to ``lengths``."""
    values, offsets = pack_rows(dense, lengths)
    if dtype == "int4":
        stream, scale, bias = int4_values(values, lengths)
        return stream, offsets, scale, bias
    if dtype != "int8":
        return values.to(getattr(torch, dtype)), offsets, None, None
    # Symmetric per-row quantisation: value = q * scale (bias 0).
    rows = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    scale = (dense.abs().amax(1) / 127).clamp(min=1e-12)
    q = torch.round(values / scale[rows]).to(torch.int8)
    return q, offsets, scale, torch.zeros_like(scale)


def int4_values(values: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row asymmetric int4 of packed rows: ``bias = lo``, ``scale = (hi - lo) / 15``,
    ``u = round((x - lo) / scale)`` in [0, 15]; the codes two a byte, low nibble first
    (docs/lookup.md). Returns (uint8 (ceil(S / 2),), scale (N,), bias (N,))."""
    n, device = lengths.numel(), lengths.device
    rows = torch.repeat_interleave(torch.arange(n, device=device), lengths)
    lo = torch.zeros(n, device=device).scatter_reduce(0, rows, values, "amin", include_self=False)
    hi = torch.zeros(n, device=device).scatter_reduce(0, rows, values, "amax", include_self=False)
    scale = (hi - lo) / 15
    u = torch.round((values - lo[rows]) / scale[rows].clamp(min=1e-30)).clamp(0, 15)
    codes = u.to(torch.uint8)
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    return codes[0::2] | (codes[1::2] << 4), scale, lo


def ns_per_id(rows: int, dims: tuple[int, ...], gen: torch.Generator) -> None:
    """Print ns per id of the bag operators alone (1 thread, 4096 bags of 20 uniform ids)."""
    torch.set_num_threads(1)
    dtypes = ("float32", "float16", "bfloat16", "int8", "int4")
    print(f"ns per id, 1 thread, 4096 bags of {BAG_LEN} uniform ids, median of 15 calls")
    print(f"{'D':>4} {'N':>8} {'torch':>7} " + " ".join(f"{t:>8}" for t in dtypes))
    for n in (rows, 10_000):
        for d in dims:
            dense, rank_to_row, lengths = make_table(n, d, gen)
            ids = sample_ids("uniform", 4096 * BAG_LEN, rank_to_row, gen)
            offsets = torch.arange(4096) * BAG_LEN
            bag = nn.EmbeddingBag.from_pretrained(dense, mode="sum")
            cells = [median_ns(partial(bag, ids, offsets), ids.numel())]
            for dtype in dtypes:
                values, row_offsets, scale, bias = packed_values(dense, lengths, dtype)
                packed_bag = PackedEmbeddingBag(values, row_offsets, d, scale=scale, bias=bias,
                                                mode="sum")
                cells.append(median_ns(partial(packed_bag, ids, offsets), ids.numel()))
            print(f"{d:>4} {n:>8} " + " ".join(f"{c:>8.2f}" for c in cells), flush=True)


def placement(rows: int, gen: torch.Generator) -> None:
    """Print ns per id of the bag ops for K hot ids, consecutive rows or scattered over N.

    Every row keeps 3/8 of D, so only where the rows lie differs. Scattered hot rows spread over
    more pages and lines; the packed lookup also reads a scattered entry of `offsets` per id. Run
    it with THP_MEM_ALLOC_ENABLE=1 to put torch's allocations of 2 MB and more (both tables and
    the kernel's offsets copy) on huge pages; the line after each D says how much of this process
    was on huge pages (Linux).
    """
    torch.set_num_threads(1)
    print(f"ns per id, 1 thread, 512 bags of {BAG_LEN} ids drawn from K hot rows, N={rows}, "
          "lengths 3/8 D")
    print(f"{'D':>4} {'K':>6} {'hot rows':>12} {'torch':>7} {'packed':>7} {'ratio':>6}")
    for d in (16, 64, 128):
        lengths = torch.full((rows,), d * 3 // 8)
        dense = torch.randn(rows, d, generator=gen)
        dense = torch.where(torch.arange(d) < lengths[:, None], dense, 0.0)
        values, offsets = pack_rows(dense, lengths)
        bag = nn.EmbeddingBag.from_pretrained(dense, mode="sum")
        packed_bag = PackedEmbeddingBag(values, offsets, d, mode="sum")
        bag_offsets = torch.arange(512) * BAG_LEN
        for k in (2000, 20000):
            for where in ("consecutive", "scattered"):
                hot = (torch.arange(k) if where == "consecutive"
                       else torch.randperm(rows, generator=gen)[:k])
                ids = hot[torch.randint(0, k, (512 * BAG_LEN,), generator=gen)]
                ns = [min(median_ns(partial(fn, ids, bag_offsets), ids.numel()) for _ in range(3))
                      for fn in (bag, packed_bag)]
                print(f"{d:>4} {k:>6} {where:>12} {ns[0]:>7.2f} {ns[1]:>7.2f} "
                      f"{ns[1] / ns[0]:>6.2f}", flush=True)
        print(f"     (AnonHugePages of this process: {anon_huge_pages()})")
        del dense, values, offsets, bag, packed_bag
        gc.collect()


def anon_huge_pages() -> str:
    """This process's memory on transparent huge pages, as /proc reports it ("n/a" off Linux)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            line = next((ln for ln in f if ln.startswith("AnonHugePages:")), None)
    except OSError:
        return "n/a"
    return " ".join(line.split()[1:]) if line else "n/a"


# DRAM bandwidth by device name (the vendors' data sheets, GB/s), for the "% of peak" columns;
# the first entry whose text is in torch.cuda.get_device_name() applies. --peak-gbs overrides.
PEAK_GBS = (
    ("H200", 4800), ("H100 NVL", 3900), ("H100 PCIe", 2000), ("H100", 3350),
    ("A100 80GB PCIe", 1935), ("A100-SXM4-80GB", 2039), ("A100", 1555), ("L40S", 864),
    ("L4", 300), ("A10G", 600), ("A10", 600), ("V100", 900), ("T4", 320), ("RTX 4090", 1008),
)


def cuda_time_us(fns: dict[str, object], repeats: int) -> dict[str, float]:
    """Median microseconds per call of each of ``fns``, timed with CUDA events around blocks of
    calls (about 2 ms each), the functions' turns rotating from sample to sample."""
    for fn in fns.values():
        fn()  # compiles the Triton kernels of this shape
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    first = next(iter(fns.values()))
    start.record()
    for _ in range(10):
        first()
    end.record()
    end.synchronize()
    once_ms = max(start.elapsed_time(end) / 10, 1e-4)
    block = max(1, min(1000, int(2.0 / once_ms)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start.record()
            for _ in range(block):
                fns[name]()
            end.record()
            end.synchronize()
            samples[name].append(1e3 * start.elapsed_time(end) / block)
    return {name: statistics.median(t) for name, t in samples.items()}


def cuda_grid(args: argparse.Namespace) -> None:
    """The grid on a CUDA device: PackedEmbedding(Bag) (the Triton kernels) against nn.Embedding
    (Bag) on the same GPU, with the kernel alone and the bandwidth reached."""
    if not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None else \
            "no CUDA device is visible"
        raise SystemExit(f"bench/lookup.py --device cuda: CUDA is not available ({why}, torch "
                         f"{torch.__version__}); run it on a machine with a GPU")
    from amtl_compress.lookup import triton_ops

    if not triton_ops.triton_available():
        raise SystemExit(f"bench/lookup.py --device cuda: Triton cannot be imported "
                         f"({triton_ops._import_error()}); install triton (CUDA builds of torch "
                         "ship it)")
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    if args.peak_gbs:
        peak, source = args.peak_gbs, "--peak-gbs"
    else:
        peak, source = next(((gbs, f"table entry {key!r}") for key, gbs in PEAK_GBS
                             if key in name), (None, "not in the table: pass --peak-gbs"))
    rows_list = (args.rows,) if args.rows else ((100_000,) if args.quick
                                                else (1_000_000, 10_000_000))
    dims = (16, 128) if args.quick else (16, 64, 128)
    batches = (512, 4096) if args.quick else (512, 4096, 65536)
    repeats = args.repeats or (5 if args.quick else 9)
    print(f"device={name} peak={peak} GB/s ({source}) values={args.dtype} bag_len={BAG_LEN} "
          f"repeats={repeats} torch={torch.__version__} triton={_triton_version()}")
    print("ratio = time(packed module) / time(torch module), per call, CUDA events; < 1 is "
          "faster\nkernel = the same with the Triton kernel alone (no argument checks and "
          "their device-to-host copy)\nGB/s = bytes each side must move (ids, offsets, kept "
          "values, scale/bias, output) / time; torch: whole rows; kernel time for ours\n"
          "Zipf cells are served partly from L2, so their GB/s can pass the DRAM peak")
    print(f"{'N':>9} {'D':>4} {'B':>6} {'ids':>8} {'kept%':>6} | {'emb':>6} {'kernel':>6} "
          f"{'torch_us':>8} {'GB/s':>6} {'torch':>6} | {'bag':>6} {'kernel':>6} {'torch_us':>8} "
          f"{'GB/s':>6} {'torch':>6}")
    ratios: dict[str, list[float]] = {"embedding": [], "embedding kernel": [], "bag(sum)": [],
                                      "bag(sum) kernel": []}
    best_fraction = 0.0
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.inference_mode():
        for n in rows_list:
            for d in dims:
                cells = cuda_dim(n, d, batches, args.dtype, repeats, gen, peak)
                for cell in cells:
                    for key, value in cell["ratios"].items():
                        ratios[key].append(value)
                    best_fraction = max(best_fraction, cell["fraction"])
                    print(cell["line"], flush=True)
                torch.cuda.empty_cache()
    for op, rs in ratios.items():
        print(f"{op}: median {statistics.median(rs):.3f}  max {max(rs):.3f}  over {len(rs)} cells")
    if peak:
        print(f"highest uniform-id kernel bandwidth: {100 * best_fraction:.0f} % of {peak} GB/s")
    met = all(statistics.median(ratios[op]) <= 1.0 and max(ratios[op]) <= 1.3
              for op in ("embedding", "bag(sum)"))
    print(f"target (median <= 1.0x, no cell > 1.3x, modules): {'met' if met else 'not met'}")


def _triton_version() -> str:
    import triton

    return triton.__version__


def cuda_dim(n: int, d: int, batches: tuple[int, ...], dtype: str, repeats: int,
             gen: torch.Generator, peak: float | None) -> list[dict]:
    """Time every (distribution, B) cell of one (N, D) on the GPU; one dict per cell (its
    printed line, its ratios, the kernel's fraction of ``peak`` GB/s for uniform ids)."""
    from amtl_compress.lookup import triton_ops

    dense, rank_to_row, lengths = make_table(n, d, gen)
    values, offsets, scale, bias = packed_values(dense, lengths, dtype)
    emb = nn.Embedding.from_pretrained(dense)
    bag = nn.EmbeddingBag.from_pretrained(dense, mode="sum")
    packed = PackedEmbedding(values, offsets, d, scale=scale, bias=bias)
    packed_bag = PackedEmbeddingBag(values, offsets, d, scale=scale, bias=bias, mode="sum")
    kernel_offsets, _ = packed._kernel_offsets(offsets, values)  # what the module passes
    kept = 100 * int(offsets[-1]) / (n * d)
    value_bits = 4 if dtype == "int4" else 8 * torch.empty(0, dtype=values.dtype).element_size()
    per_row = 8 if scale is not None else 0  # scale and bias, float32 each
    off_bytes = kernel_offsets.element_size()
    cells = []
    for dist in ("uniform", "zipf"):
        for b in batches:
            ids = sample_ids(dist, b, rank_to_row, gen)
            bag_ids = sample_ids(dist, b * BAG_LEN, rank_to_row, gen)
            bag_offsets = torch.arange(b, device=ids.device) * BAG_LEN
            bounds = torch.arange(b + 1, device=ids.device) * BAG_LEN

            def moved(look: Tensor, outputs: int) -> tuple[float, float]:
                """(bytes ours, bytes torch) for looking up ``look`` into ``outputs`` rows."""
                kept_values = int(lengths[look].sum())
                common = look.numel() * look.element_size() + outputs * d * 4
                ours = (common + look.numel() * (2 * off_bytes + per_row)
                        + kept_values * value_bits / 8)
                return ours, common + look.numel() * d * 4

            t_emb = cuda_time_us({
                "ours": partial(packed, ids), "torch": partial(emb, ids),
                "kernel": partial(triton_ops.launch_embedding, values, kernel_offsets, scale,
                                  bias, ids, d)}, repeats)
            t_bag = cuda_time_us({
                "ours": partial(packed_bag, bag_ids, bag_offsets),
                "torch": partial(bag, bag_ids, bag_offsets),
                "kernel": partial(triton_ops.launch_embedding_bag, values, kernel_offsets, scale,
                                  bias, bag_ids, bounds, None, "sum", d, None)}, repeats)
            emb_bytes, bag_bytes = moved(ids, b), moved(bag_ids, b)
            cols = []
            for t, (ours_b, torch_b) in ((t_emb, emb_bytes), (t_bag, bag_bytes)):
                cols.append(f"{t['ours'] / t['torch']:>6.3f} {t['kernel'] / t['torch']:>6.3f} "
                            f"{t['torch']:>8.1f} {ours_b / t['kernel'] / 1e3:>6.0f} "
                            f"{torch_b / t['torch'] / 1e3:>6.0f}")
            fraction = 0.0
            if peak and dist == "uniform":
                fraction = max(emb_bytes[0] / t_emb["kernel"], bag_bytes[0] / t_bag["kernel"]) \
                    / 1e3 / peak
            cells.append({
                "line": f"{n:>9} {d:>4} {b:>6} {dist:>8} {kept:>6.1f} | {cols[0]} | {cols[1]}",
                "ratios": {"embedding": t_emb["ours"] / t_emb["torch"],
                           "embedding kernel": t_emb["kernel"] / t_emb["torch"],
                           "bag(sum)": t_bag["ours"] / t_bag["torch"],
                           "bag(sum) kernel": t_bag["kernel"] / t_bag["torch"]},
                "fraction": fraction})
    del dense, values, offsets, emb, bag, packed, packed_bag, kernel_offsets
    gc.collect()
    return cells


def median_ns(fn, count: int) -> float:
    fn()
    samples = []
    for _ in range(15):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return 1e9 * statistics.median(samples) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grid: N=100k, fewer cells")
    parser.add_argument("--rows", type=int, default=None, help="N (default 1M, 100k with --quick)")
    parser.add_argument("--repeats", type=int, default=None, help="timed samples per cell")
    parser.add_argument("--dtype", default="float32",
                        choices=["float32", "float16", "bfloat16", "int8", "int4"],
                        help="packed values dtype (the torch baseline stays float32)")
    parser.add_argument("--threads", default="1,2",
                        help="comma-separated thread counts per cell (default 1,2)")
    parser.add_argument("--ns-per-id", action="store_true",
                        help="instead: ns per id of the bag operator per values dtype, 1 thread")
    parser.add_argument("--round-lengths", type=int, default=1, metavar="K",
                        help="pack rows with lengths rounded up to a multiple of K values (K = 16 "
                             "starts every float32 row on a 64-byte line; costs bytes)")
    parser.add_argument("--placement", action="store_true",
                        help="instead: bag ns per id for hot ids on consecutive or scattered rows")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"],
                        help="cuda: the grid on the GPU (N = 1M and 10M, CUDA events), the "
                             "Triton kernels against nn.Embedding(Bag) there")
    parser.add_argument("--peak-gbs", type=float, default=None,
                        help="the GPU's DRAM bandwidth in GB/s for the %% of peak (default: "
                             "looked up by device name in PEAK_GBS)")
    args = parser.parse_args()
    if args.round_lengths < 1:
        parser.error("--round-lengths must be >= 1")
    if args.device == "cuda":
        if args.ns_per_id or args.placement or args.round_lengths > 1 or args.threads != "1,2":
            parser.error("--device cuda runs the grid only (no --ns-per-id, --placement, "
                         "--round-lengths or --threads)")
        cuda_grid(args)
        return
    n = args.rows or (100_000 if args.quick else 1_000_000)
    dims = (16, 128) if args.quick else (16, 64, 128)
    batches = (512, 4096) if args.quick else (512, 4096, 65536)
    repeats = args.repeats or (5 if args.quick else 9)
    load_kernel()
    gen = torch.Generator().manual_seed(0)
    if args.ns_per_id:
        with torch.inference_mode():
            ns_per_id(n, dims, gen)
        return
    if args.placement:
        with torch.inference_mode():
            placement(n, gen)
        return
    rounded = (f" lengths rounded up to a multiple of {args.round_lengths}"
               if args.round_lengths > 1 else "")
    print(f"N={n} bag_len={BAG_LEN} values={args.dtype} repeats={repeats} "
          f"torch={torch.__version__} cpu_capability={torch.backends.cpu.get_cpu_capability()}"
          f"{rounded}")
    print("ratio = time(packed) / time(torch); < 1 is faster")
    print("torch_us = median time of one torch call (microseconds)")
    print(f"{'D':>4} {'B':>6} {'ids':>8} {'thr':>3} {'kept%':>6} {'embedding':>10} "
          f"{'torch_us':>9} {'bag(sum)':>9} {'torch_us':>9}")
    ratios: dict[str, list[float]] = {"embedding": [], "bag(sum)": []}
    with torch.inference_mode():
        for d in dims:
            threads = tuple(int(t) for t in args.threads.split(","))
            for r_emb, r_bag in bench_dim(n, d, batches, args.dtype, repeats, gen, threads,
                                          args.round_lengths):
                ratios["embedding"].append(r_emb)
                ratios["bag(sum)"].append(r_bag)
            gc.collect()
    for op, rs in ratios.items():
        geo = math.exp(statistics.fmean(math.log(r) for r in rs))
        print(f"{op}: median {statistics.median(rs):.3f}  max {max(rs):.3f}  "
              f"geomean {geo:.3f}  over {len(rs)} cells")


if __name__ == "__main__":
    main()
