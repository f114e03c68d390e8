"""Benchmark streaming a folder of Parquet files: time and peak RSS as the data grows.

For each size (default 1M, 8M, 64M rows) writes a folder of Parquet files into a temporary
folder (two Zipf id columns, one float32 column, an int8 label; written row group by row group,
so building it needs little memory), then in a FRESH child process per size counts the
frequencies of one id column and iterates every batch once (B = 4096, shuffled), and prints
rows, bytes on disk, both times, rows/s and the child's peak RSS of each phase (VmHWM, reset
between the phases through /proc/self/clear_refs) and the peak bytes held by pyarrow's memory
pool. Peak RSS should not grow with the rows; the count's (N,) int64 array grows with N, not
with the rows.

    .venv/bin/python bench/stream.py                        # 1M, 8M, 64M rows
    .venv/bin/python bench/stream.py --sizes 200000 --files 2   # quick

Not a test and not imported by the package.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

NUM_USERS = 1_000_000  # N of the counted column
NUM_ITEMS = 100_000
ROW_GROUP = 1 << 18
BATCH = 4096


def status_kib(key: str) -> int:
    """A ``/proc/self/status`` field in KiB (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise KeyError(key)


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where the kernel refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def write_folder(folder: Path, rows: int, files: int, seed: int = 0) -> int:
    """Write ``rows`` rows over ``files`` Parquet files; return the bytes on disk."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    per_file = -(-rows // files)
    written = 0
    for f in range(files):
        n_file = min(per_file, rows - written)
        with pq.ParquetWriter(folder / f"part-{f:03d}.parquet", _schema()) as writer:
            for start in range(0, n_file, ROW_GROUP):
                n = min(ROW_GROUP, n_file - start)
                table = pa.table(
                    {
                        "user_id": np.minimum(rng.zipf(1.2, n) - 1, NUM_USERS - 1),
                        "item_id": np.minimum(rng.zipf(1.1, n) - 1, NUM_ITEMS - 1),
                        "price": rng.random(n, dtype=np.float32),
                        "label": (rng.random(n) < 0.25).astype(np.int8),
                    },
                    schema=_schema(),
                )
                writer.write_table(table, row_group_size=ROW_GROUP)
        written += n_file
    return sum(p.stat().st_size for p in folder.iterdir())


def _schema():
    import pyarrow as pa

    return pa.schema(
        [("user_id", pa.int64()), ("item_id", pa.int64()), ("price", pa.float32()),
         ("label", pa.int8())]
    )  # fmt: skip


def child(folder: str) -> None:
    """Count, then iterate once; print one JSON line of measurements (its own process)."""
    import pyarrow as pa

    from amtl_compress.data import ParquetDataset, count_frequencies

    baseline = status_kib("VmRSS")
    resettable = reset_peak()
    start = time.perf_counter()
    counts = count_frequencies(folder, "user_id", NUM_USERS)
    count_s = time.perf_counter() - start
    count_peak = status_kib("VmHWM")
    del counts
    resettable = reset_peak() and resettable
    data = ParquetDataset.open(folder)
    start = time.perf_counter()
    rows = batches = 0
    for _, labels in data.batches(BATCH, shuffle=True, seed=0):
        rows += len(labels)
        batches += 1
    iterate_s = time.perf_counter() - start
    print(json.dumps({
        "rows": rows, "batches": batches, "expected_batches": data.num_batches(BATCH),
        "count_s": count_s, "iterate_s": iterate_s, "baseline_kib": baseline,
        "count_peak_kib": count_peak, "iterate_peak_kib": status_kib("VmHWM"),
        "peaks_separate": resettable, "arrow_peak_bytes": pa.default_memory_pool().max_memory(),
    }))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1000000,8000000,64000000")
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--tmpdir", default=None, help="where the data goes (~0.7 GB at 64M)")
    parser.add_argument("--child", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return

    work = Path(tempfile.mkdtemp(prefix="amtl-bench-stream-", dir=args.tmpdir))
    print(
        f"B = {BATCH}, shuffled (buffer 65,536 rows); counted column N = {NUM_USERS:,}; "
        f"{args.files} files, row groups of {ROW_GROUP:,} rows"
    )
    print(
        f"{'rows':>11} {'MB disk':>8} {'count s':>8} {'iter s':>7} {'rows/s iter':>12} "
        f"{'RSS base MB':>12} {'peak count MB':>14} {'peak iter MB':>13} {'arrow peak MB':>14}"
    )
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            folder = work / f"rows_{size}"
            disk = write_folder(folder, size, args.files)
            result = subprocess.run(
                [sys.executable, __file__, "--child", str(folder)],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            m = json.loads(result.stdout.strip().splitlines()[-1])
            if m["rows"] != size or m["batches"] != m["expected_batches"]:
                raise SystemExit(f"iterated {m['rows']} rows in {m['batches']} batches: wrong")
            print(
                f"{size:>11,} {disk / 1e6:>8.1f} {m['count_s']:>8.2f} {m['iterate_s']:>7.2f} "
                f"{size / m['iterate_s']:>12,.0f} {m['baseline_kib'] / 1024:>12.0f} "
                f"{m['count_peak_kib'] / 1024:>14.0f} {m['iterate_peak_kib'] / 1024:>13.0f} "
                f"{m['arrow_peak_bytes'] / 2**20:>14.1f}"
            )
            if not m["peaks_separate"]:
                print("  (VmHWM could not be reset: 'peak iter' includes the count phase)")
            shutil.rmtree(folder)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
