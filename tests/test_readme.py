"""The README's Python snippets, run as written against a real fine-tune + pack.

The snippets name a user package (`my_pkg.models:build`), `train.parquet` and `packed/`. The
fixture makes all three in a temporary directory: an importable `my_pkg/models.py` factory, a
small Parquet data set, a base checkpoint, a run fine-tuned with `amtl_compress.finetune` and
packed with `amtl_compress.pack`. Each snippet is then executed there, and the test checks what
its comments promise. A snippet that stops working fails here; a new snippet fails
`test_every_snippet_is_covered` until a test runs it.

The public API is reached through `amtl_compress.<name>` only (the package's lazy exports).
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import amtl_compress

README = Path(__file__).resolve().parents[1] / "README.md"
NUM_USERS, NUM_ITEMS, DIM = 943, 300, 8

MODELS_PY = f'''
import torch
from torch import nn


class TwoTables(nn.Module):
    """A user model: two embedding tables and a linear head over a dict batch."""

    def __init__(self):
        super().__init__()
        self.embeddings = nn.ModuleDict({{
            "user_id": nn.Embedding({NUM_USERS}, {DIM}),
            "item_id": nn.Embedding({NUM_ITEMS}, {DIM}),
        }})
        self.head = nn.Linear({2 * DIM}, 1)

    def forward(self, batch):
        u = self.embeddings["user_id"](batch["user_id"])
        i = self.embeddings["item_id"](batch["item_id"])
        return self.head(torch.cat([u, i], dim=1)).squeeze(1)


def build():
    torch.manual_seed(0)  # the same weights on every call, so the test can compare
    return TwoTables()
'''


def snippets() -> list[str]:
    """The ```python blocks of README.md, in order."""
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def _snippet(marker: str) -> str:
    found = [s for s in snippets() if marker in s]
    assert len(found) == 1, f"expected one README snippet containing {marker!r}, got {len(found)}"
    return found[0]


def _write_data(path: Path, rows: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    # Half the rows from a Zipf head, half uniform: most users appear, so the realized ratio can
    # land near any budget (rows that share a count share a length, docs/amtl.md).
    head = np.minimum(rng.zipf(1.2, rows) - 1, NUM_USERS - 1)
    users = np.where(rng.random(rows) < 0.5, head, rng.integers(0, NUM_USERS, rows))
    users = users.astype(np.int64)
    items = rng.integers(0, NUM_ITEMS, rows, dtype=np.int64)
    labels = ((users + items) % 3 == 0).astype(np.int64)
    pq.write_table(pa.table({"user_id": users, "item_id": items, "label": labels}), path)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory):
    """A directory holding my_pkg/, train.parquet, valid.parquet, base.safetensors,
    runs/amtl1 (fine-tuned at ratio 0.4) and packed/ (float32), with my_pkg importable."""
    root = tmp_path_factory.mktemp("readme")
    (root / "my_pkg").mkdir()
    (root / "my_pkg" / "__init__.py").write_text("")
    (root / "my_pkg" / "models.py").write_text(MODELS_PY)
    _write_data(root / "train.parquet", 3000, seed=0)
    _write_data(root / "valid.parquet", 500, seed=1)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        mp.chdir(root)
        for name in ("my_pkg", "my_pkg.models"):
            sys.modules.pop(name, None)
        from my_pkg.models import build

        save_file(build().state_dict(), root / "base.safetensors")
        config = amtl_compress.FinetuneConfig(
            fields={"user_id": "user_id", "item_id": "item_id"},
            epochs=1, batch_size=256, target_ratio=0.4,
        )
        amtl_compress.finetune(root / "base.safetensors", root / "train.parquet",
                               root / "valid.parquet", root / "runs" / "amtl1", config,
                               model_factory="my_pkg.models:build", progress=False)
        amtl_compress.pack(root / "runs" / "amtl1", root / "packed", dtype="float32",
                           progress=False)
        yield root
        for name in ("my_pkg", "my_pkg.models"):
            sys.modules.pop(name, None)


def _first_batch(path: str, rows: int = 64) -> dict[str, torch.Tensor]:
    features, _ = next(iter(amtl_compress.open_data(path).batches(rows)))
    return features


def test_every_snippet_is_covered() -> None:
    blocks = snippets()
    assert len(blocks) == 2, "a README ```python block was added or removed: cover it here"
    assert "load_packed" in blocks[0] and "attach_amtl_" in blocks[1]
    assert "AMTLBudget" in blocks[1]


def test_serving_snippet_gives_the_fine_tuned_outputs(workspace: Path) -> None:
    batch = _first_batch("valid.parquet")
    namespace: dict = {"batch": batch}  # the user's batch: a dict of tensors (docs/data.md)
    exec(compile(_snippet("load_packed"), "README.md", "exec"), namespace)

    model = namespace["model"]
    packed = [m for m in model.modules() if isinstance(m, amtl_compress.PackedEmbedding)]
    assert len(packed) == 2, "both fine-tuned tables are served packed"
    assert sum(m.values.numel() for m in packed) < (NUM_USERS + NUM_ITEMS) * DIM * 0.45
    finetuned, _ = amtl_compress.load_model(workspace / "runs" / "amtl1" / "model.safetensors")
    with torch.no_grad():
        want = finetuned(batch)
    # "exactly what the fine-tuned model gave": bitwise, float32.
    assert torch.equal(namespace["logits"].detach(), want)


def test_serving_snippet_on_the_meta_device(workspace: Path) -> None:
    """The snippet's comment for tables larger than RAM: build under `torch.device("meta")`."""
    source = _snippet("load_packed")
    build_line = [line for line in source.splitlines() if line.startswith("model = build()")]
    assert len(build_line) == 1 and 'with torch.device("meta")' in source
    meta = source.replace(build_line[0],
                          'import torch\nwith torch.device("meta"):\n    model = build()')
    batch = _first_batch("valid.parquet")
    namespace: dict = {"batch": batch}
    exec(compile(meta, "README.md", "exec"), namespace)
    model = namespace["model"]
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    finetuned, _ = amtl_compress.load_model(workspace / "runs" / "amtl1" / "model.safetensors")
    with torch.no_grad():
        assert torch.equal(namespace["logits"].detach(), finetuned(batch))


def _statement_end(lines: list[str], prefix: str) -> int:
    """Index just past the one top-level statement starting with ``prefix`` (its comment lines
    included), so the snippet can be run in pieces."""
    starts = [i for i, line in enumerate(lines) if line.startswith(prefix)]
    assert len(starts) == 1, f"expected one line starting with {prefix!r}"
    end = starts[0] + 1
    while end < len(lines) and (lines[end].startswith("#") or lines[end].startswith(" " * 20)):
        end += 1
    return end


def test_python_steps_snippet_attaches_trains_and_compresses(workspace: Path) -> None:
    """The loop snippet, run in three pieces: attach + budget (outputs unchanged), the user's
    loop ("train as usual" with the two budget lines: it compresses to 40%), detach."""
    from my_pkg.models import build

    source = _snippet("attach_amtl_")
    lines = source.splitlines()
    assert not [line for line in lines if line.split("#")[0].strip() == "..."], "runs as written"
    setup_end = _statement_end(lines, "budget = AMTLBudget(")
    detach_at = _statement_end(lines, "model, lengths = detach_amtl(model)") - 1
    pieces = ["\n".join(lines[:setup_end]), "\n".join(lines[setup_end:detach_at]),
              "\n".join(lines[detach_at:])]
    assert "for epoch in range(epochs)" in pieces[1] and "budget.step()" in pieces[1]

    batch = _first_batch("train.parquet", rows=256)
    with torch.no_grad():
        original = build().eval()(batch)
    namespace: dict = {}
    exec(compile(pieces[0], "README.md", "exec"), namespace)
    model, budget = namespace["model"], namespace["budget"]
    model.eval()
    with torch.no_grad():
        # Attached, under a budget whose schedule starts at ratio 1: nothing is cut yet, and the
        # default ordering="pca" rotates each table and back (float rounding only).
        torch.testing.assert_close(model(batch), original, rtol=0, atol=1e-5)
    assert budget.realized == {"embeddings.user_id": 1.0}
    model.train()

    exec(compile(pieces[1], "README.md", "exec"), namespace)
    assert not budget.warming_up and budget.steps_done == budget.total_steps
    realized = namespace["ratios"]["embeddings.user_id"]
    # "train as usual" compresses: the table lands on the budget.
    assert abs(realized - 0.4) <= amtl_compress_tolerance()
    model.eval()
    with torch.no_grad():
        masked = model(batch)

    exec(compile(pieces[2], "README.md", "exec"), namespace)
    model, lengths = namespace["model"], namespace["lengths"]
    # detach gives a plain nn.Embedding back (RotatedEmbedding: an nn.Embedding whose rows are
    # multiplied by the stored rotation after the lookup).
    assert isinstance(model.embeddings["user_id"], nn.Embedding), "detach puts a plain table back"
    assert set(lengths) == {"embeddings.user_id"}
    assert lengths["embeddings.user_id"].shape == (NUM_USERS,)
    assert int(lengths["embeddings.user_id"].min()) >= 1
    assert int(lengths["embeddings.user_id"].max()) <= DIM
    kept = float(lengths["embeddings.user_id"].double().mean()) / DIM
    assert kept == pytest.approx(realized)
    with torch.no_grad():
        assert torch.equal(model.eval()(batch), masked), "plain model = masked model"


def amtl_compress_tolerance() -> float:
    from amtl_compress.training.finetune import BUDGET_TOLERANCE

    return BUDGET_TOLERANCE
