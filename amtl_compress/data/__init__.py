"""The data contract (docs/data.md): Parquet/CSV files -> dict batches, id counts, data sets.

Two data sets come built in: MovieLens-100K (:func:`build_ctr_dataset`) and a synthetic one with
planted Zipf id frequencies (:func:`make_synthetic_ctr`).

:func:`open_data` opens one file in memory (:class:`TabularData`) or a folder/glob of Parquet
files streamed (:class:`ParquetDataset`); both satisfy :class:`CTRData`.
"""

from amtl_compress.data.counts import count_frequencies, read_counts
from amtl_compress.data.dataset import CTRData, TabularData
from amtl_compress.data.movielens import build_ctr_dataset, fetch_movielens_100k
from amtl_compress.data.splits import CTRSplits
from amtl_compress.data.stream import ParquetDataset, open_data
from amtl_compress.data.synthetic import make_synthetic_ctr

__all__ = [
    "CTRData",
    "CTRSplits",
    "ParquetDataset",
    "TabularData",
    "build_ctr_dataset",
    "count_frequencies",
    "fetch_movielens_100k",
    "make_synthetic_ctr",
    "open_data",
    "read_counts",
]
