"""Benchmark ``pack``: throughput and peak RSS on a large table, or bytes and AUC on a real model.

Default mode: builds a run directory in a temporary folder with one float32 table (default
4M x 128 = 2 GiB, written chunk by chunk so building it needs little memory), frequency-skewed
lengths (mean ~37 % of D), then packs it once per dtype in a CHILD process, so that building the
source does not count towards the measured peak. Prints MB/s of source and the child's peak RSS
(VmHWM). Target: peak RSS under 1 GB whatever the table size.

``--two-table``: the byte accounting of docs/format.md on a real model. Trains a DLRM with D = 64
on MovieLens-100k (the demo's data and split, seed 0), fine-tunes AMTL on user_id and item_id at
``target_ratio`` 0.4 with the library defaults (dimension ordering "pca": a rotation of float16
values per table), packs the run in every dtype and prints each one's bytes by part with its
ratio to the dense float32 tables and the test AUC of the fine-tuned model with its tables and
rotations replaced by the decoded packed ones, and whether the float32 packed model's test
predictions equal the fine-tuned model's bitwise; the warm start's error (the trained tables
rotated and rotated back, with R rounded to float16 values as attach does, against the
orthogonal float32 Q of before); the rotation as stored (format version 4: at the values'
precision) against the fine-tuned one; int8 with float16 scale/bias against version 1's float32
ones, and int4 with version 4's symmetric float16 scale against version 3's scale + bias and a
scale + zero point (decode error over every kept value, AUC). Then the same for a second
fine-tune with ``AMTLConfig(ordering="none")`` (no rotation stored); the AUC-vs-bytes points of
format versions 2, 3 and 4; and whether each target of the format (float32 <= 0.44, int8 <=
0.14, int4 <= 0.08 with test AUC within 0.002 of float32) is met with each ordering. 8-10
minutes on 2 cores shared with other jobs.

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
    from amtl_compress.lookup.load import load_packed_model
    from amtl_compress.models.dlrm import dlrm_config_for
    from amtl_compress.run_dir import RunDir
    from amtl_compress.storage.format import prefix_mask, read_packed_table
    from amtl_compress.storage.header import read_header
    from amtl_compress.storage.pack import pack
    from amtl_compress.storage.quantize import dequantize_values
    from amtl_compress.training.config import FinetuneConfig, TrainConfig
    from amtl_compress.training.finetune import finetune
    from amtl_compress.training.loop import evaluate, predict
    from amtl_compress.training.train import train_dlrm

    start = time.perf_counter()
    ctr = build_ctr_dataset(fetch_movielens_100k(), work / "data", seed=seed)
    base = work / "base.safetensors"
    train_dlrm(ctr.train, ctr.valid, base, TrainConfig(seed=seed),
               dlrm_config=dlrm_config_for(ctr, embedding_dim=64), progress=False)
    test = TabularData.open(ctr.test)
    _warm_start(base)

    def padded(table, decoded: torch.Tensor) -> torch.Tensor:
        rows = torch.zeros(table.num_embeddings, table.embedding_dim)
        rows[prefix_mask(table.lengths, table.embedding_dim)] = decoded
        return rows

    measured: dict[str, dict[str, tuple[float, float]]] = {}  # ordering -> dtype -> (ratio, AUC)
    versions: list[tuple[str, ...]] = []  # rows of the AUC-vs-bytes table by format version
    for ordering in orderings:
        result = finetune(
            base, ctr.train, ctr.valid, work / f"amtl-{ordering}",
            FinetuneConfig(fields={f: f for f in TWO_TABLE_FIELDS}, target_ratio=0.4, seed=seed,
                           amtl=AMTLConfig(ordering=ordering)),
            resume=False, overwrite=True, progress=False,
        )
        model_file = RunDir(result.run_dir).model_file

        def auc_with(
            rows_of: dict[str, torch.Tensor],
            rotations: dict[str, torch.Tensor] | None = None,
            model_file: Path = model_file,
        ) -> float:
            """Test AUC of the fine-tuned model with these (N, D) tables (and (D, D) rotations)
            in place of its own."""
            model = load_model(model_file)[0]
            with torch.no_grad():
                for path, rows in rows_of.items():
                    model.get_submodule(path).weight.copy_(rows)
                for path, rotation in (rotations or {}).items():
                    model.get_submodule(path).rotation.copy_(rotation)
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
        rotation_rows = [("dtype", "rotation stored", "bytes", "max |err|", "AUC fine-tuned R",
                          "AUC stored R")]
        quantized_tables: dict[str, dict] = {}
        measured[ordering] = {}
        for dtype in dtypes:
            report = pack(result.run_dir, work / f"packed-{ordering}-{dtype}", dtype=dtype,
                          overwrite=True, progress=False)
            print(f"$ amtl-compress pack <run, ordering={ordering}> --dtype {dtype}")
            print(report.format_table() + "\n")
            decoded, rotations, exact_rotations = {}, {}, {}
            for entry in report.tables:
                table = read_packed_table(entry.file)
                if dtype in ("int8", "int4"):
                    quantized_tables.setdefault(dtype, {})[entry.field] = table
                decoded[entry.field] = padded(
                    table, dequantize_values(table.values, table.offsets, table.scale, table.bias)
                )
                if table.rotation is not None:
                    rotations[entry.field] = table.rotation
                    exact_rotations[entry.field] = load_model(model_file)[0].get_submodule(
                        entry.field
                    ).rotation.detach().clone()
            codes = sorted({read_header(e.file).tensors["rotation"].dtype
                            for e in report.tables if e.stored.rotation})
            if dtype == "float32":
                finetuned = predict(load_model(model_file)[0], test.batches(4096))[0]
                packed = predict(load_packed_model(work / f"packed-{ordering}-{dtype}"),
                                 test.batches(4096))[0]
                print(f"float32 packed model (rotation stored as {', '.join(codes) or 'none'}): "
                      f"test predictions bitwise equal to the fine-tuned model's: "
                      f"{torch.equal(finetuned, packed)}\n")
            b = report.stored
            auc = auc_with(decoded, rotations)
            measured[ordering][dtype] = (b.ratio, auc)
            summary.append((dtype, f"{b.values:,}", f"{b.index:,}", f"{b.row_metadata:,}",
                            f"{b.rotation:,}", f"{b.total:,}", f"{b.ratio:.3f}",
                            f"{(b.total - b.rotation) / b.dense:.3f}", f"{auc:.4f}"))
            # The same values with the fine-tuned rotation (float32 in version 3).
            auc_f32_rotation = auc_with(decoded, exact_rotations) if rotations else auc
            if rotations:
                err = max((rotations[p] - exact_rotations[p]).abs().max().item()
                          for p in rotations)
                code = " + ".join(codes) + (" + F16 row scale" if "I8" in codes else "")
                rotation_rows.append((dtype, code, f"{b.rotation:,}", f"{err:.2e}",
                                      f"{auc_f32_rotation:.4f}", f"{auc:.4f}"))
            versions.append(_version_row(ordering, dtype, report, auc, auc_f32_rotation))
        print(f"ordering={ordering!r}: dense float32 tables {report.stored.dense:,} bytes; "
              "ratio = total / dense; test AUC with the decoded packed rows (and rotations) in "
              "the fine-tuned model")
        print(_columns(summary) + "\n")
        if len(rotation_rows) > 1:
            print("the rotation as stored (format version 4) against the fine-tuned one: "
                  "largest entry error, and test AUC with the packed rows and either rotation")
            print(_columns(rotation_rows) + "\n")
        if "int8" in quantized_tables:
            _int8_params(quantized_tables["int8"], model_file, auc_with, padded, versions,
                         ordering)
        if "int4" in quantized_tables:
            _int4_params(quantized_tables["int4"], model_file, auc_with, padded, versions,
                         ordering)
    _versions(versions)
    _targets(measured)


def _warm_start(base: Path) -> None:
    """The warm start's error on the trained tables: max |W' R - W| with R rounded to float16
    values and W' = W R^{-1} (``onto_principal_axes``, what attach does) against the orthogonal
    float32 R = Q^T and W' = W Q (before), both products in float32 as the model computes them."""
    import torch

    from amtl_compress.checkpoint import load_model
    from amtl_compress.core.rotation import onto_principal_axes, principal_axes, rotate_rows

    model = load_model(base)[0]
    rows = [("table", "N x D", "max |W|", "W Q, R = Q^T (f32)", "W R^-1, R in f16",
             "max |R - Q^T|", "sigma(R) range")]
    for field in TWO_TABLE_FIELDS:
        w = model.embeddings[field].weight.detach()
        q_t = principal_axes(w)
        old = (rotate_rows(w @ q_t.T, q_t) - w).abs().max().item()
        rotated, r = onto_principal_axes(w)
        new = (rotate_rows(rotated, r) - w).abs().max().item()
        sv = torch.linalg.svdvals(r.double())
        rows.append((field, f"{w.shape[0]} x {w.shape[1]}", f"{w.abs().max().item():.3f}",
                     f"{old:.2e}", f"{new:.2e}", f"{(r - q_t).abs().max().item():.2e}",
                     f"[{sv.min().item():.5f}, {sv.max().item():.5f}]"))
    print("warm start: max |W' R - W| on the trained tables (float32 products)")
    print(_columns(rows) + "\n")


def _version_row(ordering: str, dtype: str, report, auc: float, auc_f32_rotation: float):
    """Bytes and test AUC of this pack as format versions 2, 3 and 4 would store it.

    Versions 2 and 3 store the same values as version 4 (except int8 in version 2 and int4 in
    version 3, whose AUC :func:`_int8_params` / :func:`_int4_params` fill in) and a float32
    rotation: version 2 int64 offsets (8 (N + 1) bytes) and float32 int8 scale/bias (8 N);
    version 3 the same 1-byte lengths as version 4 and float16 scale/bias (4 N).
    """
    v4 = report.stored
    rows = sum(t.rows for t in report.tables)
    rotated = [t for t in report.tables if t.stored.rotation]
    f32_rotation = sum(4 * t.embedding_dim**2 for t in rotated)
    quantized = dtype in ("int8", "int4")
    v3 = v4.values + v4.index + (4 * rows if quantized else 0) + f32_rotation
    v2 = v4.values + 8 * (rows + len(report.tables)) + (8 * rows if quantized else 0) + f32_rotation
    return {
        "ordering": ordering, "dtype": dtype, "dense": v4.dense,
        2: (v2 / v4.dense, auc_f32_rotation) if dtype != "int4" else None,
        3: (v3 / v4.dense, auc_f32_rotation),
        4: (v4.ratio, auc),
    }


def _versions(rows: list[dict]) -> None:
    """The AUC-vs-bytes points of each format version (docs/benchmarks.md, "Packing")."""
    out = [("ordering", "dtype", "v2 ratio", "v2 AUC", "v3 ratio", "v3 AUC", "v4 ratio", "v4 AUC")]
    for r in rows:
        cells = []
        for version in (2, 3, 4):
            point = r[version]
            cells += ["-", "-"] if point is None else [f"{point[0]:.3f}", f"{point[1]:.4f}"]
        out.append((r["ordering"], r["dtype"], *cells))
    print("AUC against bytes by format version: the same fine-tuned tables stored as versions "
          "2, 3 and 4 (ratio to the dense float32 bytes; test AUC with the decoded rows and "
          "rotations; version 2 has no int4)")
    print(_columns(out) + "\n")


def _affine_error_rows(name_to_decoded, kept_of, steps_of, aucs):
    """Rows of a decode-error table: mean/max |err|, max |err| / scale, mean scale, AUC."""
    import torch

    rows = []
    for name, decoded in name_to_decoded.items():
        err = torch.cat([(decoded[p] - kept_of[p]).abs() for p in kept_of])
        step = torch.cat([steps_of[name][p] for p in kept_of])
        coded = step > 0
        rows.append((name, f"{err.mean().item():.3e}", f"{err.max().item():.3e}",
                     f"{(err[coded] / step[coded]).max().item():.4f}",
                     f"{step.mean().item():.4e}", f"{aucs[name]:.4f}"))
    return rows


def _int8_params(tables, model_file, auc_with, padded, versions, ordering) -> None:
    """int8 parameters: float16 scale/bias (versions 3, 4) against version 1's float32 ones."""

    from amtl_compress.checkpoint import load_model
    from amtl_compress.storage.format import prefix_mask
    from amtl_compress.storage.quantize import dequantize_values, int8_encode

    model = load_model(model_file)[0]
    names = ("float32 (v1, v2)", "float16 (v3, v4)")
    decoded = {n: {} for n in names}
    steps = {n: {} for n in names}
    kept_of, rows_v1, rotations = {}, {}, {}
    for path, table in tables.items():
        weight = model.get_submodule(path).weight.detach()
        kept = kept_of[path] = weight[prefix_mask(table.lengths, table.embedding_dim)]
        q, scale, bias = int8_encode(kept, table.lengths, float16_params=False)
        decoded[names[0]][path] = dequantize_values(q, table.offsets, scale, bias)
        steps[names[0]][path] = scale.float().repeat_interleave(table.lengths)
        rows_v1[path] = padded(table, decoded[names[0]][path])
        decoded[names[1]][path] = dequantize_values(
            table.values, table.offsets, table.scale, table.bias
        )
        steps[names[1]][path] = table.scale.float().repeat_interleave(table.lengths)
        if table.rotation is not None:
            rotations[path] = table.rotation
    # Both with the fine-tuned rotation; version 4's int8 rotation is measured above.
    aucs = {names[0]: auc_with(rows_v1)}
    aucs[names[1]] = auc_with({p: padded(t, decoded[names[1]][p]) for p, t in tables.items()})
    for r in versions:
        if r["ordering"] == ordering and r["dtype"] == "int8":
            r[2] = (r[2][0], aucs[names[0]])
    _print_decode_errors("int8", "int8 scale/bias", decoded, kept_of, steps, aucs)


def _print_decode_errors(dtype, first_column, decoded, kept_of, steps, aucs) -> None:
    """The decode-error table of one dtype's candidate encodings (rows of _affine_error_rows)."""
    rows = [(first_column, "mean |err|", "max |err|", "max |err| / scale", "mean scale",
             "test AUC")] + _affine_error_rows(decoded, kept_of, steps, aucs)
    print(f"{dtype} decode error over all {sum(len(k) for k in kept_of.values())} kept values "
          "(test AUC with the fine-tuned rotation)")
    print(_columns(rows) + "\n")


def _zero_point_int4(kept, lengths):
    """The int4 candidate not taken: a float16 scale and a uint8 zero point z in [0, 15] per row
    (3 bytes), ``x' = (u - z) * scale`` over [min(lo, 0), max(hi, 0)]. Returns (x', scale)."""
    import numpy as np
    import torch

    from amtl_compress.storage.quantize import _f16_up, _row_ranges

    x, counts, lo, hi = _row_ranges(kept, lengths)
    lo0, hi0 = np.minimum(lo, np.float32(0)), np.maximum(hi, np.float32(0))
    scale = _f16_up((hi0 - lo0) / np.float32(15)).astype(np.float32)
    step = np.where(scale > 0, scale, np.float32(1))
    z = np.clip(np.rint(-lo0 / step), 0, 15).astype(np.float32)
    u = np.clip(np.rint(x / np.repeat(step, counts)) + np.repeat(z, counts), 0, 15)
    decoded = (u - np.repeat(z, counts)) * np.repeat(scale, counts)
    return torch.from_numpy(decoded.astype(np.float32)), torch.from_numpy(scale)


def _int4_params(tables, model_file, auc_with, padded, versions, ordering) -> None:
    """int4 row parameters: version 4's symmetric float16 scale (2 bytes a row) against version
    3's float16 scale + bias (4) and a float16 scale + uint8 zero point (3)."""
    from amtl_compress.checkpoint import load_model
    from amtl_compress.storage.format import prefix_mask
    from amtl_compress.storage.quantize import dequantize_values, int4_encode, pack_nibbles

    model = load_model(model_file)[0]
    names = ("scale + bias (v3), 4 B", "scale + zero point, 3 B", "scale only (v4), 2 B")
    decoded = {n: {} for n in names}
    steps = {n: {} for n in names}
    kept_of = {}
    for path, table in tables.items():
        weight = model.get_submodule(path).weight.detach()
        kept = kept_of[path] = weight[prefix_mask(table.lengths, table.embedding_dim)]
        q, scale, bias = int4_encode(kept, table.lengths, symmetric=False)
        decoded[names[0]][path] = dequantize_values(pack_nibbles(q), table.offsets, scale, bias)
        steps[names[0]][path] = scale.float().repeat_interleave(table.lengths)
        zp, zp_scale = _zero_point_int4(kept, table.lengths)
        decoded[names[1]][path] = zp
        steps[names[1]][path] = zp_scale.repeat_interleave(table.lengths)
        decoded[names[2]][path] = dequantize_values(
            table.values, table.offsets, table.scale, table.bias
        )
        steps[names[2]][path] = table.scale.repeat_interleave(table.lengths)
    # All three with the fine-tuned rotation, so only the row code differs.
    aucs = {
        n: auc_with({p: padded(t, decoded[n][p]) for p, t in tables.items()}) for n in names
    }
    for r in versions:
        if r["ordering"] == ordering and r["dtype"] == "int4":
            r[3] = (r[3][0], aucs[names[0]])
    _print_decode_errors("int4", "int4 row params", decoded, kept_of, steps, aucs)


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
