"""Benchmark ``pack``: throughput and peak RSS on a large table, or bytes and AUC on a real model.

Default mode: builds a run directory in a temporary folder with one float32 table (default
4M x 128 = 2 GiB, written chunk by chunk so building it needs little memory), frequency-skewed
lengths (mean ~37 % of D), then packs it once per dtype in a CHILD process, so that building the
source does not count towards the measured peak. Prints MB/s of source and the child's peak RSS
(VmHWM). Target: peak RSS under 1 GB whatever the table size.

``--two-table``: the byte accounting of docs/format.md on a real model. Trains a DLRM with D = 64
on MovieLens-100k (the demo's data and split, seed 0), fine-tunes AMTL on user_id and item_id at
``target_ratio`` 0.4 with the library defaults (dimension ordering "pca": a float32 rotation
per table), packs the run in every dtype and prints each one's bytes by part with its ratio to
the dense float32 tables and the test AUC of the fine-tuned model with its tables replaced by
the decoded packed rows; then int8 with version 3's float16 scale/bias against version 1's
float32 ones (decode error over every kept value, AUC). Then the same for a second fine-tune
with ``AMTLConfig(ordering="none")`` (no rotation stored), and whether each target of the
format (float32 <= 0.44, int8 <= 0.14, int4 <= 0.08 with test AUC within 0.002 of float32) is
met with each ordering. 8 minutes on 2 cores shared with other jobs.

    .venv/bin/python bench/pack.py                      # 4M x 128, all dtypes
    .venv/bin/python bench/pack.py --rows 200000 --dtypes float32   # quick
    .venv/bin/python bench/pack.py --two-table          # bytes by part and AUC, D = 64

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


TWO_TABLE_FIELDS = ("user_id", "item_id")
#: Issue targets on this model: packed bytes / dense float32 bytes at target_ratio 0.4.
TWO_TABLE_TARGETS = {"float32": 0.44, "int8": 0.14, "int4": 0.08}
#: int4's test AUC may be at most this far below float32's.
INT4_MAX_AUC_DROP = 0.002


def two_table(work: Path, dtypes: list[str], orderings: list[str], seed: int = 0) -> None:
    """The ``--two-table`` mode (module docstring); prints its tables."""
    import torch

    from amtl_compress.checkpoint import load_model
    from amtl_compress.core.amtl import AMTLConfig
    from amtl_compress.data.dataset import TabularData
    from amtl_compress.data.movielens import build_ctr_dataset, fetch_movielens_100k
    from amtl_compress.models.dlrm import dlrm_config_for
    from amtl_compress.run_dir import RunDir
    from amtl_compress.storage.format import prefix_mask, read_packed_table
    from amtl_compress.storage.pack import pack
    from amtl_compress.storage.quantize import dequantize_values
    from amtl_compress.training.config import FinetuneConfig, TrainConfig
    from amtl_compress.training.finetune import finetune
    from amtl_compress.training.loop import evaluate
    from amtl_compress.training.train import train_dlrm

    start = time.perf_counter()
    ctr = build_ctr_dataset(fetch_movielens_100k(), work / "data", seed=seed)
    base = work / "base.safetensors"
    train_dlrm(ctr.train, ctr.valid, base, TrainConfig(seed=seed),
               dlrm_config=dlrm_config_for(ctr, embedding_dim=64), progress=False)
    test = TabularData.open(ctr.test)

    def padded(table, decoded: torch.Tensor) -> torch.Tensor:
        rows = torch.zeros(table.num_embeddings, table.embedding_dim)
        rows[prefix_mask(table.lengths, table.embedding_dim)] = decoded
        return rows

    measured: dict[str, dict[str, tuple[float, float]]] = {}  # ordering -> dtype -> (ratio, AUC)
    for ordering in orderings:
        result = finetune(
            base, ctr.train, ctr.valid, work / f"amtl-{ordering}",
            FinetuneConfig(fields={f: f for f in TWO_TABLE_FIELDS}, target_ratio=0.4, seed=seed,
                           amtl=AMTLConfig(ordering=ordering)),
            resume=False, overwrite=True, progress=False,
        )
        model_file = RunDir(result.run_dir).model_file

        def auc_with(rows_of: dict[str, torch.Tensor], model_file: Path = model_file) -> float:
            """Test AUC of the fine-tuned model with these (N, D) tables in place of its own."""
            model = load_model(model_file)[0]
            with torch.no_grad():
                for path, rows in rows_of.items():
                    model.get_submodule(path).weight.copy_(rows)
            return evaluate(model, test.batches(4096))["auc"]

        tables = result.metrics["tables"]
        rows_total = sum(t["rows"] for t in tables.values())
        sizes = " + ".join(str(t["rows"]) for t in tables.values())
        kept_dims = ", ".join(f"{t['column']} {t['avg_kept_dim']:.2f}" for t in tables.values())
        print(f"MovieLens-100k, DLRM D = 64, AMTL at target_ratio 0.4, ordering={ordering!r} "
              f"(seed {seed}): {sizes} = {rows_total:,} rows; mean kept dims {kept_dims} of 64 "
              f"({time.perf_counter() - start:.0f} s so far)")
        finetuned_auc = evaluate(load_model(model_file)[0], test.batches(4096))["auc"]
        print(f"fine-tuned model, test AUC {finetuned_auc:.4f}\n")
        summary = [("dtype", "values", "index", "row meta", "rotation", "total", "ratio",
                    "w/o rotation", "test AUC")]
        int8_tables = {}
        measured[ordering] = {}
        for dtype in dtypes:
            report = pack(result.run_dir, work / f"packed-{ordering}-{dtype}", dtype=dtype,
                          overwrite=True, progress=False)
            print(f"$ amtl-compress pack <run, ordering={ordering}> --dtype {dtype}")
            print(report.format_table() + "\n")
            decoded = {}
            for entry in report.tables:
                table = read_packed_table(entry.file)
                if dtype == "int8":
                    int8_tables[entry.field] = table
                decoded[entry.field] = padded(
                    table, dequantize_values(table.values, table.offsets, table.scale, table.bias)
                )
            b = report.stored
            auc = auc_with(decoded)
            measured[ordering][dtype] = (b.ratio, auc)
            summary.append((dtype, f"{b.values:,}", f"{b.index:,}", f"{b.row_metadata:,}",
                            f"{b.rotation:,}", f"{b.total:,}", f"{b.ratio:.3f}",
                            f"{(b.total - b.rotation) / b.dense:.3f}", f"{auc:.4f}"))
        print(f"ordering={ordering!r}: dense float32 tables {report.stored.dense:,} bytes; "
              "ratio = total / dense; test AUC with the decoded packed rows in the fine-tuned "
              "model")
        print(_columns(summary) + "\n")
        if ordering == orderings[0] and int8_tables:
            _int8_params(int8_tables, model_file, auc_with, measured[ordering]["int8"][1], padded)
    _targets(measured)


def _int8_params(int8_tables, model_file, auc_with, v3_auc: float, padded) -> None:
    """int8 parameters: version 3's float16 scale/bias against version 1's float32 ones."""
    import torch

    from amtl_compress.checkpoint import load_model
    from amtl_compress.storage.format import prefix_mask
    from amtl_compress.storage.quantize import dequantize_values, int8_encode

    errors: dict[str, list[torch.Tensor]] = {"float32 (v1)": [], "float16 (v3)": []}
    steps: dict[str, list[torch.Tensor]] = {"float32 (v1)": [], "float16 (v3)": []}
    rows_v1 = {}
    for path, table in int8_tables.items():
        weight = load_model(model_file)[0].get_submodule(path).weight.detach()
        kept = weight[prefix_mask(table.lengths, table.embedding_dim)]
        q, scale, bias = int8_encode(kept, table.lengths, float16_params=False)
        v1 = dequantize_values(q, table.offsets, scale, bias)
        rows_v1[path] = padded(table, v1)
        v3 = dequantize_values(table.values, table.offsets, table.scale, table.bias)
        for name, decoded, s in (("float32 (v1)", v1, scale), ("float16 (v3)", v3, table.scale)):
            errors[name].append((decoded - kept).abs())
            steps[name].append(s.float().repeat_interleave(table.lengths))
    rows = [("int8 scale/bias", "mean |err|", "max |err|", "max |err| / scale", "mean scale",
             "test AUC")]
    for name in errors:
        err, step = torch.cat(errors[name]), torch.cat(steps[name])
        coded = step > 0
        auc = auc_with(rows_v1) if name.startswith("float32") else v3_auc
        rows.append((name, f"{err.mean().item():.3e}", f"{err.max().item():.3e}",
                     f"{(err[coded] / step[coded]).max().item():.4f}",
                     f"{step.mean().item():.4e}", f"{auc:.4f}"))
    print(f"int8 decode error over all {sum(len(e) for e in errors['float16 (v3)'])} kept values")
    print(_columns(rows) + "\n")


def _targets(measured: dict[str, dict[str, tuple[float, float]]]) -> None:
    """Each target of TWO_TABLE_TARGETS per ordering: the ratio (rotation counted), met or not."""
    rows = [("ordering", "dtype", "ratio", "target", "met", "test AUC", "AUC vs float32")]
    for ordering, by_dtype in measured.items():
        fp32_auc = by_dtype.get("float32", (0.0, float("nan")))[1]
        for dtype, target in TWO_TABLE_TARGETS.items():
            if dtype not in by_dtype:
                continue
            ratio, auc = by_dtype[dtype]
            met = ratio <= target
            drop = ""
            if "float32" in by_dtype:
                drop = f"{round(auc - fp32_auc, 4) + 0.0:+.4f}"  # + 0.0: no "-0.0000"
                if dtype == "int4":
                    met = met and fp32_auc - auc <= INT4_MAX_AUC_DROP
            rows.append((ordering, dtype, f"{ratio:.3f}", f"<= {target}", "yes" if met else "no",
                         f"{auc:.4f}", drop))
    print("targets (packed bytes / dense float32 bytes, every stored byte counted; int4 also "
          f"needs test AUC within {INT4_MAX_AUC_DROP} of float32)")
    print(_columns(rows))


def _columns(rows: list[tuple[str, ...]]) -> str:
    """Rows of strings as right-aligned columns (first column left-aligned), header ruled."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        rest = zip(r[1:], widths[1:], strict=True)
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in rest]
        lines.append("  ".join(cells))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--two-table", action="store_true",
                        help="bytes by part and test AUC of a D = 64 MovieLens model")
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--dtypes", default=None,
                        help="comma-separated; default float32,float16,bfloat16,int8,int4 "
                        "(--two-table: float32,float16,int8,int4)")
    parser.add_argument("--orderings", default="pca,none",
                        help="--two-table: comma-separated AMTLConfig orderings, one fine-tune "
                        "each (default pca,none: the default, rotated, and no rotation)")
    parser.add_argument("--tmpdir", default=None, help="where the ~2-3 GB of files go")
    parser.add_argument("--child", nargs=3, metavar=("RUN", "OUT", "DTYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.two_table:
        work = Path(tempfile.mkdtemp(prefix="amtl-bench-two-table-", dir=args.tmpdir))
        try:
            two_table(work, (args.dtypes or "float32,float16,int8,int4").split(","),
                      args.orderings.split(","))
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return
    args.dtypes = args.dtypes or "float32,float16,bfloat16,int8,int4"

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
