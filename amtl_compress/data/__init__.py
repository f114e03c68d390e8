"""The data contract (docs/data.md): Parquet/CSV files -> dict batches, id counts, MovieLens."""

from amtl_compress.data.counts import count_frequencies, read_counts
from amtl_compress.data.dataset import TabularData
from amtl_compress.data.movielens import build_ctr_dataset, fetch_movielens_100k
from amtl_compress.data.splits import CTRSplits

__all__ = [
    "CTRSplits",
    "TabularData",
    "build_ctr_dataset",
    "count_frequencies",
    "fetch_movielens_100k",
    "read_counts",
]
