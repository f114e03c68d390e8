"""MovieLens-100k: the RecBole reader and CTR builder on tiny hand-written files, no network."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from amtl_compress.data import movielens
from amtl_compress.data.dataset import TabularData
from amtl_compress.data.movielens import build_ctr_dataset, fetch_movielens_100k
from amtl_compress.data.splits import CTRSplits
from amtl_compress.errors import DataError
from amtl_compress.models.dlrm import dlrm_config_for

INTER = """user_id:token\titem_id:token\trating:float\ttimestamp:float
10\t2\t5\t881250949
10\t1\t3\t891717742
2\t1\t4\t878887116
7\t30\t1\t880606923
2\t30\t4\t886397596
7\t2\t2\t884182806
10\t30\t4\t881171488
2\t2\t1\t891628467
7\t1\t5\t886324817
10\t2\t4\t883603013
"""
USER = """user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token
2\t53\tF\tother\t94043
7\t24\tM\ttechnician\t85711
10\t53\tM\twriter\tT8H1N
"""
ITEM = """item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq
1\tToy Story\t1995\tAnimation Children's Comedy
2\tGoldenEye\t1995\tAction Thriller
30\tunkonwn\tunkonwn\t
"""


def write_ml(directory: Path, inter: str = INTER, user: str = USER, item: str = ITEM) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ml-100k.inter").write_text(inter)
    (directory / "ml-100k.user").write_text(user)
    (directory / "ml-100k.item").write_text(item)
    return directory


def test_build_ctr_dataset_encodes_every_field(tmp_path: Path) -> None:
    src = write_ml(tmp_path / "src")
    splits = build_ctr_dataset(src, tmp_path / "out", seed=0)
    assert splits.categorical == {
        "user_id": 3,
        "item_id": 3,
        "age": 2,
        "gender": 2,
        "occupation": 3,
        "zip_prefix": 3,  # "9", "8", "T"
        "release_year": 2,  # "1995", "unkonwn"
    }
    # Genres Action, Animation, Children's, Comedy, Thriller get 1..5; 0 is padding.
    assert splits.list_fields == {"genres": 6}
    assert splits.dense == () and splits.label == "label"
    assert CTRSplits.load(tmp_path / "out") == splits

    rows = []
    for path in (splits.train, splits.valid, splits.test):
        rows += pq.read_table(path).to_pylist()
    assert len(rows) == 10
    by_key = {(r["user_id"], r["item_id"]): r for r in rows}
    # user 10 -> code 2 (numeric order 2 < 7 < 10), item 2 -> code 1, item 30 -> code 2.
    r = by_key[(2, 1)]
    assert r["label"] == 1  # rating 5
    assert r["age"] == 1 and r["gender"] == 1 and r["occupation"] == 2  # 53, M, writer
    assert r["zip_prefix"] == 2  # "T" sorts after the digits
    assert r["release_year"] == 0
    assert r["genres"] == [1, 5]  # Action, Thriller
    assert by_key[(0, 0)]["genres"] == [2, 3, 4] and by_key[(0, 0)]["label"] == 1  # rating 4
    assert by_key[(0, 1)]["label"] == 0  # rating 1
    assert by_key[(1, 2)]["genres"] == [] and by_key[(1, 2)]["release_year"] == 1
    assert sum(r["label"] for r in rows) == 6  # ratings >= 4

    # The files satisfy the data contract and fit the schema.
    train = TabularData.open(splits.train)
    assert train.list_columns == ("genres",)
    for column, n in {**splits.categorical, **splits.list_fields}.items():
        train.validate_ids(column, n)
    assert dlrm_config_for(splits).categorical == splits.categorical


def test_split_is_80_10_10_and_fixed_by_the_seed(tmp_path: Path) -> None:
    lines = ["user_id:token\titem_id:token\trating:float"]
    lines += [
        f"{u}\t{i}\t{(u + i) % 5 + 1}" for u in (2, 7, 10) for i in (1, 2, 30) for _ in range(4)
    ]
    lines += ["2\t1\t3"] * 4  # 40 ratings
    src = write_ml(tmp_path / "src", inter="\n".join(lines) + "\n")

    def split_rows(out: Path, seed: int) -> dict[str, list]:
        s = build_ctr_dataset(src, out, seed=seed)
        return {
            n: pq.read_table(p).to_pylist()
            for n, p in zip("tvs", (s.train, s.valid, s.test), strict=True)
        }

    a = split_rows(tmp_path / "a", 0)
    assert [len(a[k]) for k in "tvs"] == [32, 4, 4]
    assert split_rows(tmp_path / "b", 0) == a
    assert split_rows(tmp_path / "c", 1) != a
    # Deterministic across machines: the permutation is numpy's PCG64, pinned here.
    assert movielens._split_rows(10, 0)["valid"].tolist() == [8]
    assert movielens._split_rows(10, 0)["test"].tolist() == [1]


def test_reader_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="ml-100k.inter` does not exist"):
        build_ctr_dataset(tmp_path / "nowhere", tmp_path / "out")
    bad_header = write_ml(tmp_path / "h", user=USER.replace("zip_code:token", "zip:token"))
    with pytest.raises(DataError, match="has no column `zip_code`"):
        build_ctr_dataset(bad_header, tmp_path / "out")
    short_line = write_ml(tmp_path / "s", inter=INTER + "3\t4\n")
    with pytest.raises(DataError, match=r"ml-100k.inter`, line 12: 2 tab-separated fields"):
        build_ctr_dataset(short_line, tmp_path / "out")
    unknown_user = write_ml(tmp_path / "u", inter=INTER + "99\t1\t4\t0\n")
    with pytest.raises(DataError, match="row 10: user `99` is not in"):
        build_ctr_dataset(unknown_user, tmp_path / "out")
    dup = write_ml(tmp_path / "d", item=ITEM + "2\tAgain\t1996\tDrama\n")
    with pytest.raises(DataError, match="item `2` is listed twice"):
        build_ctr_dataset(dup, tmp_path / "out")
    empty = write_ml(tmp_path / "e", inter="")
    with pytest.raises(DataError, match="ml-100k.inter` is empty"):
        build_ctr_dataset(empty, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ---- fetch: pip is replaced by a fake that writes a small wheel ----


def fake_wheel(directory: Path, files: dict[str, bytes]) -> Path:
    wheel = directory / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("recbole/__init__.py", "")
        for name, data in files.items():
            zf.writestr(f"recbole/dataset_example/ml-100k/{name}", data)
        zf.writestr("recbole/dataset_example/ml-100k/ml-100k.kg", "not extracted")
    return wheel


@pytest.fixture
def fake_pip(monkeypatch: pytest.MonkeyPatch):
    files = {
        "ml-100k.inter": INTER.encode(),
        "ml-100k.user": USER.encode(),
        "ml-100k.item": ITEM.encode(),
    }
    calls: list[list[str]] = []

    def run(cmd, **kwargs):
        calls.append(cmd)
        fake_wheel(Path(cmd[cmd.index("-d") + 1]), files)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(movielens.subprocess, "run", run)
    monkeypatch.setattr(
        movielens, "FILES", {n: hashlib.sha256(d).hexdigest() for n, d in files.items()}
    )
    return calls


def test_fetch_downloads_once_into_the_cache(tmp_path: Path, monkeypatch, fake_pip) -> None:
    monkeypatch.setenv("AMTL_COMPRESS_CACHE", str(tmp_path / "cache"))
    d = fetch_movielens_100k()
    assert d == tmp_path / "cache" / "ml-100k"
    assert sorted(p.name for p in d.iterdir()) == ["ml-100k.inter", "ml-100k.item", "ml-100k.user"]
    assert (d / "ml-100k.user").read_text() == USER
    assert fake_pip[0][1:4] == ["-m", "pip", "download"] and "recbole==1.2.1" in fake_pip[0]
    assert fetch_movielens_100k() == d and len(fake_pip) == 1  # cached: pip not called again


def test_fetch_accepts_a_directory_holding_the_files(tmp_path: Path, fake_pip) -> None:
    own = write_ml(tmp_path / "mine")
    assert fetch_movielens_100k(own) == own and fake_pip == []


def test_fetch_refuses_a_directory_with_other_files(tmp_path: Path, fake_pip) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="exists but does not hold"):
        fetch_movielens_100k(busy)
    assert (busy / "notes.txt").read_text() == "keep me" and fake_pip == []


def test_fetch_checks_checksums(tmp_path: Path, monkeypatch, fake_pip) -> None:
    monkeypatch.setitem(movielens.FILES, "ml-100k.user", "0" * 64)
    with pytest.raises(DataError, match="`ml-100k.user` in .* does not match its sha256"):
        fetch_movielens_100k(tmp_path / "c")
    assert not (tmp_path / "c").exists()  # nothing half-extracted


def test_fetch_reports_a_pip_failure(tmp_path: Path, monkeypatch) -> None:
    def run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution\n")

    monkeypatch.setattr(movielens.subprocess, "run", run)
    with pytest.raises(DataError) as exc:
        fetch_movielens_100k(tmp_path / "c")
    msg = str(exc.value)
    assert "could not download `recbole==1.2.1`" in msg and "No matching distribution" in msg
    assert "\n" not in msg


def test_pinned_checksums_are_sha256_hex() -> None:
    assert set(movielens.FILES) == {"ml-100k.inter", "ml-100k.user", "ml-100k.item"}
    assert all(len(h) == 64 and int(h, 16) >= 0 for h in movielens.FILES.values())


@pytest.mark.slow
def test_real_movielens_100k(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Downloads the recbole wheel (~2 MB) through pip; skipped when pip cannot reach an index."""
    monkeypatch.setenv("AMTL_COMPRESS_CACHE", str(tmp_path / "cache"))
    try:
        src = fetch_movielens_100k()
    except DataError as exc:
        if "could not download" in str(exc):
            pytest.skip(str(exc))
        raise
    splits = build_ctr_dataset(src, tmp_path / "ml", seed=0)
    assert splits.categorical["user_id"] == 943 and splits.categorical["item_id"] == 1682
    assert splits.list_fields == {"genres": 20}  # 19 genres + padding
    sizes = [pq.ParquetFile(p).metadata.num_rows for p in (splits.train, splits.valid, splits.test)]
    assert sizes == [80_000, 10_000, 10_000]
    train = TabularData.open(splits.train)
    assert 0.5 < float(train.labels.mean()) < 0.6  # 55% of ratings are 4 or 5
