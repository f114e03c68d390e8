"""TorchRec's DLRM through amtl-compress's CLI: finetune -> pack -> eval (docs/dlrm.md, "TorchRec").

    PYTHONPATH=bench .venv/bin/python bench/torchrec_dlrm.py --out /tmp/torchrec-bench

writes the synthetic task of docs/data.md (20,000 rows; Zipf ``user_id`` / ``item_id``, a
multi-hot ``tags`` list, a dense ``activity``), trains an unmodified ``torchrec.models.dlrm.DLRM``
on it with a plain Adam loop (3 epochs, what a TorchRec user brings), saves its state_dict, and
runs the documented commands on it, printing each command and its output. Needs the ``torchrec``
extra (docs/dlrm.md). This file is also the commands' model factory: ``--model torchrec_dlrm:build``
with ``bench/`` on ``PYTHONPATH``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec.models.dlrm import DLRM

#: The synthetic task: make_synthetic_ctr's defaults (num_tags=20: tag ids 1..20, 21 rows).
NUM_USERS, NUM_ITEMS, NUM_TAGS, SEED = 1_000, 500, 20, 0
EMBEDDING_DIM = 16


def build() -> DLRM:
    """The model factory: a TorchRec DLRM whose feature names are the data's columns."""
    tables = [
        EmbeddingBagConfig(name="t_user", embedding_dim=EMBEDDING_DIM, num_embeddings=NUM_USERS,
                           feature_names=["user_id"]),
        EmbeddingBagConfig(name="t_item", embedding_dim=EMBEDDING_DIM, num_embeddings=NUM_ITEMS,
                           feature_names=["item_id"]),
        EmbeddingBagConfig(name="t_tags", embedding_dim=EMBEDDING_DIM,
                           num_embeddings=NUM_TAGS + 1, feature_names=["tags"]),
    ]
    return DLRM(
        embedding_bag_collection=EmbeddingBagCollection(tables=tables),
        dense_in_features=1,
        dense_arch_layer_sizes=[32, EMBEDDING_DIM],
        over_arch_layer_sizes=[64, 32, 1],
    )


def train_baseline(train: Path, out: Path, epochs: int = 3, lr: float = 3e-3) -> None:
    """Train ``build()`` with Adam on BCE-with-logits and save its state_dict to ``out``."""
    from amtl_compress.data import open_data
    from amtl_compress.models.adapters import get_adapter

    torch.manual_seed(SEED)
    adapter = get_adapter("torchrec")
    model = build()
    data = open_data(train, list_padding=adapter.list_padding)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    for epoch in range(epochs):
        for features, labels in data.batches(256, shuffle=True, seed=epoch):
            logits = adapter.forward(model, features).reshape(-1)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out))


def run(*args: str) -> None:
    """Run ``amtl-compress ARGS`` (this interpreter's), printing the command and its output."""
    print("$ amtl-compress " + " ".join(shlex.quote(a) for a in args), flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    proc = subprocess.run([sys.executable, "-m", "amtl_compress", *args], env=env, text=True,
                          capture_output=True, check=False)
    print(proc.stdout, end="", flush=True)
    if proc.returncode:
        sys.exit(proc.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/torchrec-bench"))
    parser.add_argument("--target-ratio", default="0.4")
    args = parser.parse_args()
    from amtl_compress.data.synthetic import make_synthetic_ctr

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    splits = make_synthetic_ctr(out / "data", num_users=NUM_USERS, num_items=NUM_ITEMS,
                                num_tags=NUM_TAGS, seed=SEED)
    base = out / "base.safetensors"
    start = time.perf_counter()
    train_baseline(splits.train, base)
    print(f"baseline: TorchRec DLRM trained 3 epochs in {time.perf_counter() - start:.0f} s -> "
          f"{base}\n")
    model = ["--model", "torchrec_dlrm:build", "--adapter", "torchrec"]
    run("finetune", str(base), *model, "--data", str(splits.train), "--valid",
        str(splits.valid), "--target-ratio", args.target_ratio, "--out", str(out / "run"),
        "--overwrite", "-q")
    for dtype in ("float32", "int8"):
        run("pack", str(out / "run"), "--out", str(out / f"packed-{dtype}"), "--dtype", dtype,
            "--overwrite", "-q")
    for dtype in ("float32", "int8"):
        run("eval", str(splits.test), "--checkpoint", str(base), *model, "--run",
            str(out / "run"), "--packed", str(out / f"packed-{dtype}"))


if __name__ == "__main__":
    main()
