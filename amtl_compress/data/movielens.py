"""MovieLens-100k as a CTR task (the paper's MovieLens benchmark, Sec. 3.1, at 100k scale).

The data comes from the ``recbole==1.2.1`` wheel on PyPI, which ships ml-100k in RecBole's
"atomic file" format: tab-separated text whose header names each column ``name:type``
(``ml-100k.inter``: user_id, item_id, rating, timestamp; ``ml-100k.user``: user_id, age, gender,
occupation, zip_code; ``ml-100k.item``: item_id, movie_title, release_year, class, where class
holds space-separated genres). Downloading goes through pip, so a pip mirror or proxy works.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from amtl_compress._io import atomic_directory, atomic_path
from amtl_compress.data.splits import CTRSplits
from amtl_compress.errors import DataError

RECBOLE_REQUIREMENT = "recbole==1.2.1"
CACHE_ENV = "AMTL_COMPRESS_CACHE"
_WHEEL_FOLDER = "recbole/dataset_example/ml-100k/"
# sha256 of the files inside the recbole 1.2.1 wheel, so a tampered or truncated download fails.
FILES = {
    "ml-100k.inter": "4edb74e2a81178c2ba9ff381495f754f996c4aea351b1272ca36b43da0935eff",
    "ml-100k.user": "4f670007d9cfbeb9807e757209af1555b9bcc186bde25e767f67cb67c6dd5972",
    "ml-100k.item": "51d7cdf777ce5c0f5b32c1d947a4a81fe07d75e78abbe761e0cd4d0756064532",
}
CATEGORICAL = ("user_id", "item_id", "age", "gender", "occupation", "zip_prefix", "release_year")
LIST_FIELD = "genres"
LABEL = "label"
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)

# The name kept from the brief; both data set builders return the same record type.
MovieLensCTR = CTRSplits


def default_cache_dir() -> Path:
    """``$AMTL_COMPRESS_CACHE/ml-100k`` if the variable is set, else
    ``~/.cache/amtl-compress/ml-100k``."""
    root = os.environ.get(CACHE_ENV)
    base = Path(root) if root else Path.home() / ".cache" / "amtl-compress"
    return base / "ml-100k"


def fetch_movielens_100k(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return a directory holding ``ml-100k.inter``, ``ml-100k.user`` and ``ml-100k.item``.

    If ``cache_dir`` (default :func:`default_cache_dir`) already holds the three files, nothing
    is downloaded: pass your own copy this way. Otherwise ``pip download`` fetches the
    ``recbole==1.2.1`` wheel into a temporary folder, the three files are checked against their
    sha256 and moved into ``cache_dir`` atomically.

    Raises:
        DataError: ``cache_dir`` exists with other files in it, pip fails (no network), or the
            wheel's files do not match their checksums.
    """
    d = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if all((d / name).is_file() for name in FILES):
        return d
    if d.exists() and (not d.is_dir() or any(d.iterdir())):
        raise DataError(
            f"`{d}` exists but does not hold {', '.join(f'`{n}`' for n in FILES)}: "
            "pass a new or empty directory to download into, or one holding those files"
        )
    with tempfile.TemporaryDirectory(prefix="amtl-recbole-") as tmp:
        wheel = _download_wheel(Path(tmp))
        with atomic_directory(d, overwrite=d.exists()) as out:
            _extract(wheel, out)
    return d


def _download_wheel(into: Path) -> Path:
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        "--disable-pip-version-check", RECBOLE_REQUIREMENT, "-d", str(into),
    ]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        reason = f"{type(exc).__name__}: {exc}"
    else:
        wheels = sorted(into.glob("recbole-1.2.1-*.whl"))
        if proc.returncode == 0 and wheels:
            return wheels[0]
        lines = (proc.stderr or proc.stdout or "").strip().splitlines()
        reason = f"exit {proc.returncode}: {lines[-1] if lines else 'no output'}"
    raise DataError(
        f"could not download `{RECBOLE_REQUIREMENT}` with pip ({reason}): check the network or "
        "pip index, or pass a directory holding ml-100k.inter/.user/.item"
    )


def _extract(wheel: Path, out: Path) -> None:
    with zipfile.ZipFile(wheel) as zf:
        for name, sha in FILES.items():
            try:
                data = zf.read(_WHEEL_FOLDER + name)
            except KeyError:
                raise DataError(
                    f"`{wheel.name}` has no `{_WHEEL_FOLDER + name}`: the wheel is not recbole "
                    "1.2.1; pass a directory holding the ml-100k files instead"
                ) from None
            if hashlib.sha256(data).hexdigest() != sha:
                raise DataError(
                    f"`{name}` in `{wheel.name}` does not match its sha256: the download is "
                    "corrupt or altered; delete it and retry"
                )
            (out / name).write_bytes(data)


def read_atomic_file(path: Path, required: Iterable[str]) -> dict[str, list[str]]:
    """Read a RecBole atomic file (tab-separated, header ``name:type``) into text columns.

    Returns column name (type suffix dropped) -> one string per data line.

    Raises:
        DataError: missing file, a missing required column, or a line with the wrong number of
            fields.
    """
    if not path.is_file():
        raise DataError(f"`{path}` does not exist: fetch the data set with fetch_movielens_100k")
    with open(path, encoding="utf-8", newline="") as f:
        # Split on "\n" only: str.splitlines would also break inside titles at characters
        # such as U+0085 or U+2028.
        lines = [line.removesuffix("\r") for line in f.read().split("\n")]
    if not lines[0]:
        raise DataError(f"`{path}` is empty: fetch the data set again")
    names = [h.split(":", 1)[0] for h in lines[0].split("\t")]
    missing = [c for c in required if c not in names]
    if missing:
        raise DataError(
            f"`{path}` has no column `{missing[0]}` (header: {lines[0]!r}): "
            "use RecBole's ml-100k files"
        )
    columns: dict[str, list[str]] = {n: [] for n in names}
    for lineno, line in enumerate(lines[1:], start=2):
        if not line:
            continue
        fields = line.split("\t")
        if len(fields) != len(names):
            raise DataError(
                f"`{path}`, line {lineno}: {len(fields)} tab-separated fields, header has "
                f"{len(names)}; fix the line"
            )
        for n, v in zip(names, fields, strict=True):
            columns[n].append(v)
    return columns


def _token_order(token: str) -> tuple[int, int, str]:
    # Numeric tokens in numeric order, then text: ids read naturally and never depend on hashing.
    return (0, int(token), token) if token.isdigit() else (1, 0, token)


def _encode(tokens: list[str], first: int = 0) -> tuple[np.ndarray, int]:
    """Codes (len(tokens),) int64 of each token in sorted vocabulary order from ``first``;
    also the table size N = first + vocabulary size."""
    vocab = {t: i for i, t in enumerate(sorted(set(tokens), key=_token_order), start=first)}
    return np.array([vocab[t] for t in tokens], dtype=np.int64), first + len(vocab)


def _index(ids: list[str], path: Path, what: str) -> dict[str, int]:
    index: dict[str, int] = {}
    for row, token in enumerate(ids):
        if token in index:
            raise DataError(f"`{path}`, row {row}: {what} `{token}` is listed twice; keep one")
        index[token] = row
    return index


def build_ctr_dataset(
    src_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str], seed: int = 0
) -> CTRSplits:
    """Turn ml-100k into train/valid/test Parquet files for click-through-rate prediction.

    One row per rating; ``label`` = rating >= 4 (int64 0/1). Categorical columns (int64, ids in
    [0, N)): ``user_id``, ``item_id``, ``age``, ``gender``, ``occupation``, ``zip_prefix`` (first
    character of the zip code), ``release_year``; list column ``genres`` (list<int64>, ids in
    [1, N), 0 = padding). Every field is re-indexed from the sorted distinct values of the
    ``.user``/``.item`` files (numbers in numeric order), so N covers ids unseen in training.
    Rows are split 80/10/10 by a permutation from ``numpy.random.default_rng(seed)``, identical on
    every machine; each split keeps file order. ``splits.json`` is written last.

    Returns:
        The split paths and schema (:class:`CTRSplits`).

    Raises:
        DataError: missing files/columns, malformed lines, duplicate users/items, or ratings of
            users/items absent from the ``.user``/``.item`` files.
    """
    src = Path(src_dir)
    out = Path(out_dir)
    inter_path, user_path, item_path = (src / n for n in FILES)
    inter = read_atomic_file(inter_path, ("user_id", "item_id", "rating"))
    users = read_atomic_file(user_path, ("user_id", "age", "gender", "occupation", "zip_code"))
    items = read_atomic_file(item_path, ("item_id", "release_year", "class"))
    if not inter["user_id"]:
        raise DataError(f"`{inter_path}` has no ratings: fetch the data set again")

    user_row = _index(users["user_id"], user_path, "user")
    item_row = _index(items["item_id"], item_path, "item")
    u = _rows_of(inter["user_id"], user_row, inter_path, user_path, "user")
    i = _rows_of(inter["item_id"], item_row, inter_path, item_path, "item")

    columns: dict[str, pa.Array] = {}
    sizes: dict[str, int] = {}
    user_attrs = {
        "user_id": users["user_id"],
        "age": users["age"],
        "gender": users["gender"],
        "occupation": users["occupation"],
        "zip_prefix": [z[:1] for z in users["zip_code"]],
    }
    for name, tokens in user_attrs.items():
        codes, sizes[name] = _encode(tokens)
        columns[name] = pa.array(codes[u])
    for name, tokens in {
        "item_id": items["item_id"],
        "release_year": items["release_year"],
    }.items():
        codes, sizes[name] = _encode(tokens)
        columns[name] = pa.array(codes[i])
    columns[LIST_FIELD], genre_size = _genre_lists(items["class"], i)

    try:
        ratings = np.array([float(r) for r in inter["rating"]])
    except ValueError as exc:
        raise DataError(f"`{inter_path}`: a rating is not a number ({exc}); fix the file") from None
    columns[LABEL] = pa.array((ratings >= 4).astype(np.int64))
    table = pa.table({k: columns[k] for k in (*CATEGORICAL, LIST_FIELD, LABEL)})

    paths = {}
    for split, rows in _split_rows(table.num_rows, seed).items():
        paths[split] = out / f"{split}.parquet"
        with atomic_path(paths[split]) as tmp:
            pq.write_table(table.take(pa.array(rows)), tmp)
    categorical = {k: sizes[k] for k in CATEGORICAL}
    result = CTRSplits(
        train=paths["train"],
        valid=paths["valid"],
        test=paths["test"],
        categorical=categorical,
        list_fields={LIST_FIELD: genre_size},
        dense=(),
        label=LABEL,
    )
    result.save(out)
    return result


def _rows_of(
    tokens: list[str], index: dict[str, int], inter_path: Path, table_path: Path, what: str
) -> np.ndarray:
    rows = np.empty(len(tokens), dtype=np.int64)
    for n, token in enumerate(tokens):
        row = index.get(token)
        if row is None:
            raise DataError(
                f"`{inter_path}`, row {n}: {what} `{token}` is not in `{table_path}`; "
                "use matching .inter/.user/.item files"
            )
        rows[n] = row
    return rows


def _genre_lists(classes: list[str], item_rows: np.ndarray) -> tuple[pa.Array, int]:
    """list<int64> genres per rating (ids from 1, 0 = padding) and the table size N."""
    per_item = [c.split() for c in classes]
    codes, size = _encode([g for genres in per_item for g in genres], first=1)
    offsets = np.zeros(len(per_item) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([len(g) for g in per_item])
    item_lists = pa.ListArray.from_arrays(pa.array(offsets), pa.array(codes, type=pa.int64()))
    # A data set without any genre still gets a valid bag table: padding plus one unused row.
    return item_lists.take(pa.array(item_rows)), max(size, 2)


def _split_rows(num_rows: int, seed: int) -> dict[str, np.ndarray]:
    perm = np.random.default_rng(seed).permutation(num_rows)
    n_train = int(num_rows * SPLIT_FRACTIONS[0])
    n_valid = int(num_rows * SPLIT_FRACTIONS[1])
    return {
        "train": np.sort(perm[:n_train]),
        "valid": np.sort(perm[n_train : n_train + n_valid]),
        "test": np.sort(perm[n_train + n_valid :]),
    }
