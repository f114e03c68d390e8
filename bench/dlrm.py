"""facebookresearch/dlrm's DLRM_Net through amtl-compress, end to end: the figures of docs/dlrm.md.

    python bench/dlrm.py --out runs/dlrm-bench      # about 1-2 min on 2 cores

Builds the small task of tests/dlrm_net.py (20,000 rows: dense_0..3, cat_0..2 single ids,
cat_3 a multi-hot list with id 0 a real row), trains the model with DLRM_Net's interface as
dlrm_s_pytorch.py does (SGD on sparse table gradients, BCE on its probabilities), saves it in
dlrm's checkpoint layout (``dlrm.pt``: numpy-scalar metrics, optimizer state), then runs the
commands of docs/dlrm.md and prints each command and its output:

    amtl-compress finetune dlrm.pt --model dlrm_net:build_dlrm_net --adapter dlrm ...
    amtl-compress pack run --out packed (float32, then int8)
    amtl-compress eval test.parquet --checkpoint dlrm.pt --run run --packed packed
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = ROOT / "tests"


def _run(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    print(f"$ amtl-compress {shlex.join(args)}", flush=True)
    result = subprocess.run([sys.executable, "-m", "amtl_compress", *args], cwd=cwd, env=env,
                            capture_output=True, text=True)
    print(result.stdout, end="", flush=True)
    if result.returncode != 0:
        sys.exit(result.stderr)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/dlrm-bench"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sys.path.insert(0, str(TESTS))
    import torch
    from dlrm_net import build_dlrm_net, make_dlrm_data, save_like_dlrm, train_like_dlrm

    out = args.out.resolve()
    make_dlrm_data(out, num_rows=20_000, seed=args.seed)
    torch.manual_seed(args.seed)
    model = build_dlrm_net()
    optimizer = train_like_dlrm(model, out / "train.parquet", seed=args.seed)
    save_like_dlrm(model, optimizer, out / "dlrm.pt")
    print(f"trained DLRM_Net (SGD, sparse tables) -> {out / 'dlrm.pt'}\n")
    _run(["finetune", "dlrm.pt", "--model", "dlrm_net:build_dlrm_net", "--adapter", "dlrm",
          "--data", "train.parquet", "--valid", "valid.parquet", "--field", "emb_l.{i}=cat_{i}",
          "--target-ratio", "0.4", "--out", "run", "--overwrite", "-q"], out)
    for dtype in ("float32", "int8"):
        _run(["pack", "run", "--out", f"packed-{dtype}", "--dtype", dtype, "--overwrite", "-q"],
             out)
        _run(["eval", "test.parquet", "--checkpoint", "dlrm.pt", "--model",
              "dlrm_net:build_dlrm_net", "--run", "run", "--packed", f"packed-{dtype}"], out)


if __name__ == "__main__":
    main()
