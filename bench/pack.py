"""Benchmark ``pack`` on a table larger than a comfortable working set: throughput and peak RSS.

Builds a run directory in a temporary folder with one float32 table (default 4M x 128 = 2 GiB,
written chunk by chunk so building it needs little memory), frequency-skewed lengths (mean ~37 %
of D), then packs it once per dtype in a CHILD process, so that building the source does not count
towards the measured peak. Prints MB/s of source and the child's peak RSS (VmHWM). Target: peak
RSS under 1 GB whatever the table size.

    .venv/bin/python bench/pack.py                      # 4M x 128, all dtypes
    .venv/bin/python bench/pack.py --rows 200000 --dtypes float32   # quick

Not a test and not imported by the package.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

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


def status_kib(key: str) -> int:
    """A ``/proc/self/status`` field in KiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def skewed_lengths(rows: int, dim: int, seed: int):
    """Kept lengths tied to frequency rank: frequent rows (low rank) keep more, mean ~0.37 D.

    With rank r uniform in [0, 1), L = ceil(D * (1 - r) ** 1.7) has mean ~ D / 2.7 = 0.37 D.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    rank = torch.randperm(rows, generator=g).double() / rows
    return torch.ceil(dim * (1.0 - rank) ** 1.7).clamp(1, dim).to(torch.int64)


def build_run_dir(run: Path, rows: int, dim: int, seed: int = 0) -> None:
    """A run directory as finetune writes it, streamed: model.safetensors never sits in RAM."""
    import torch

    from amtl_compress._io import atomic_save_safetensors
    from amtl_compress.storage.format import prefix_mask
    from amtl_compress.storage.header import encode_header

    run.mkdir(parents=True)
    (run / "bench_pack_model.py").write_text(MODEL_MODULE.format(rows=rows, dim=dim))
    spec = json.dumps({"kind": "factory", "factory": "bench_pack_model:build"})
    lengths = skewed_lengths(rows, dim, seed)
    atomic_save_safetensors({"emb": lengths}, run / "lengths.safetensors")
    head_w, head_b = torch.randn(1, dim), torch.zeros(1)
    prefix, _ = encode_header(
        [("emb.weight", "F32", (rows, dim)), ("head.bias", "F32", (1,)),
         ("head.weight", "F32", (1, dim))],
        {"amtl_compress.model": spec},
    )
    g = torch.Generator().manual_seed(seed)
    chunk = 1 << 18
    with open(run / "model.safetensors", "wb") as f:
        f.write(prefix)
        for start in range(0, rows, chunk):
            stop = min(start + chunk, rows)
            block = torch.randn(stop - start, dim, generator=g) * 0.05
            block[~prefix_mask(lengths[start:stop], dim)] = 0.0  # tails zeroed, as after detach
            f.write(block.numpy().tobytes())
        f.write(head_b.numpy().tobytes())
        f.write(head_w.numpy().tobytes())


def child(run: str, out: str, dtype: str) -> None:
    """Pack once and print one JSON line of measurements (runs in its own process)."""
    sys.path.insert(0, run)  # the model factory of the spec lives in the run directory
    from amtl_compress.storage.pack import pack

    baseline = status_kib("VmRSS")
    start = time.perf_counter()
    report = pack(run, out, dtype=dtype, progress=False)
    elapsed = time.perf_counter() - start
    print(json.dumps({
        "seconds": elapsed,
        "baseline_rss_kib": baseline,
        "peak_rss_kib": status_kib("VmHWM"),
        "ru_maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "bytes_before": report.bytes_before,
        "bytes_after": report.bytes_after,
        "avg_kept": report.tables[0].avg_kept,
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dtypes", default="float32,float16,bfloat16,int8")
    parser.add_argument("--tmpdir", default=None, help="where the ~2-3 GB of files go")
    parser.add_argument("--child", nargs=3, metavar=("RUN", "OUT", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    work = Path(tempfile.mkdtemp(prefix="amtl-bench-pack-", dir=args.tmpdir))
    try:
        run = work / "run"
        start = time.perf_counter()
        build_run_dir(run, args.rows, args.dim)
        os.sync()  # flush the source's dirty pages so their writeback does not throttle packing
        source_mb = args.rows * args.dim * 4 / 1e6
        print(f"source: {args.rows:,} x {args.dim} float32 = {source_mb:,.0f} MB "
              f"(built in {time.perf_counter() - start:.1f} s; page cache warm)")
        print(f"{'dtype':<9} {'time s':>7} {'MB/s src':>9} {'avg kept':>9} {'packed MB':>10} "
              f"{'ratio':>6} {'RSS base MB':>12} {'RSS peak MB':>12}")
        for dtype in args.dtypes.split(","):
            out = work / f"out_{dtype}"
            result = subprocess.run(
                [sys.executable, __file__, "--child", str(run), str(out), dtype],
                check=True, capture_output=True, text=True,
            )
            m = json.loads(result.stdout.strip().splitlines()[-1])
            print(f"{dtype:<9} {m['seconds']:>7.1f} {source_mb / m['seconds']:>9.0f} "
                  f"{m['avg_kept']:>9.2f} {m['bytes_after'] / 1e6:>10.0f} "
                  f"{m['bytes_after'] / m['bytes_before']:>6.1%} "
                  f"{m['baseline_rss_kib'] / 1024:>12.0f} {m['peak_rss_kib'] / 1024:>12.0f}")
            shutil.rmtree(out)
            os.sync()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
