"""The ``amtl-compress`` command line: thin typer commands over the Python API.

Results go to stdout, progress bars and logs to stderr. Known errors print one line
``Error: ...`` and exit with code 1; set ``AMTL_COMPRESS_DEBUG=1`` for the traceback. Library
messages name Python parameters (```overwrite=True```); :func:`cli_message` says them as flags
(``--overwrite``). Ctrl-C exits with code 130.

Over 400 lines: most of it is the typed options and help text of seven commands (docs/cli.md is
generated from them); each command body only builds a config, calls the library and prints.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Annotated, NoReturn, Optional

import typer

from amtl_compress._text import format_table
from amtl_compress.errors import AmtlError
from amtl_compress.training.launch import (
    command_ranks,
    hold_interrupts,
    raised_on_every_rank,
    torchrun_rank,
)

app = typer.Typer(
    name="amtl-compress",
    help="Shrink the embedding tables of a trained recommendation model with AMTL (CIKM'21).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: Python parameter -> its CLI option, where the two names differ.
OPTION_ALIASES = {"fields": "field", "model_factory": "model", "counts_file": "counts"}
#: Options never read from a bare `name`: their values (data column names) appear in messages
#: in backticks too, e.g. "column `label` ...".
_NOT_BARE = frozenset({"label"})
#: `name` or `name=value` in backticks, as library messages name Python parameters.
_PARAMETER = re.compile(r"`([A-Za-z_][A-Za-z0-9_]*)(?:=([^`]+))?`")

RERUN_TO_RESUME = "Interrupted; rerun the same command to resume."


def cli_message(message: str, options: Collection[str]) -> str:
    """A library message as the CLI says it: Python parameters become the flags that set them.

    In backticks, ```name=True``` becomes ``--name``, ```name=False``` ``--no-name``,
    ```name=X``` ``--name X`` and a bare ```name``` ``--name``, where ``name`` (through
    :data:`OPTION_ALIASES`) is one of ``options``, the CLI's option names with underscores
    (``target_ratio``). Anything else in backticks (paths, columns, modules) is left as it is.
    """

    def flag(match: re.Match[str]) -> str:
        name, value = match.group(1), match.group(2)
        option = OPTION_ALIASES.get(name, name)
        if option not in options or (value is None and option in _NOT_BARE):
            return match.group(0)
        dashed = option.replace("_", "-")
        if value is not None:
            value = value.strip("'\"")  # `output='probs'` -> --output probs
        if value is None or value == "True":
            return f"--{dashed}"
        if value == "False":
            return f"--no-{dashed}"
        return f"--{dashed} {value}"

    return _PARAMETER.sub(flag, message)


@functools.cache
def _option_names() -> frozenset[str]:
    """The parameter names of every command's options (``target_ratio`` for --target-ratio)."""
    import click

    group = typer.main.get_command(app)
    assert isinstance(group, click.Group)
    return frozenset(
        param.name
        for command in group.commands.values()
        for param in command.params
        if isinstance(param, click.Option) and param.name
    )


def _command(
    interrupted: Callable[..., str] = lambda **_: RERUN_TO_RESUME,
) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a subcommand whose known errors become ``Error: ...`` (exit code 1) and whose
    Ctrl-C prints ``interrupted(**the command's arguments)`` (exit code 130).

    The command is named after the function, less a trailing ``_`` (``eval_`` -> ``eval``).
    """

    def register(func: Callable[..., None]) -> Callable[..., None]:
        @functools.wraps(func)
        def wrapper(**kwargs: object) -> None:
            try:
                func(**kwargs)
            except BaseException as exc:
                _report(exc, lambda: interrupted(**kwargs))
                raise

        return app.command(func.__name__.rstrip("_"))(wrapper)

    return register


def _report(exc: BaseException, interrupted: Callable[[], str]) -> None:
    """Print the outcome ``exc`` of a command and raise its exit, or return for a bug.

    Known errors: see :func:`_fail`. Ctrl-C: rank 0 prints ``interrupted()`` (every rank got
    the signal), exit code 130. Under torchrun this runs in every rank's process group
    (training/launch.py ``command_ranks``), so rank 0 prints before any rank exits.
    """
    if isinstance(exc, (AmtlError, FileNotFoundError)):
        _fail(exc)
    if isinstance(exc, KeyboardInterrupt):
        if torchrun_rank() == 0:
            typer.echo(interrupted(), err=True)
        raise typer.Exit(130) from None


def _fail(exc: AmtlError | FileNotFoundError) -> NoReturn:
    """Print ``exc`` as one ``Error: ...`` line on stderr and exit with code 1.

    Under torchrun an error that every rank raised is printed by rank 0 only; one that another
    rank raised alone is printed by that rank, naming it. ``AMTL_COMPRESS_DEBUG=1`` re-raises
    instead, for the traceback.
    """
    if os.environ.get("AMTL_COMPRESS_DEBUG"):
        raise exc
    if isinstance(exc, FileNotFoundError):
        message = f"no such file `{exc.filename}`; check the path"
    else:
        message = cli_message(str(exc), _option_names())
    rank = torchrun_rank()
    if rank == 0:
        typer.echo(f"Error: {message}", err=True)
    elif not raised_on_every_rank(exc):  # rank 0 did not see it: say it here, and where
        typer.echo(f"Error: (rank {rank}) {message}", err=True)
    raise typer.Exit(1) from None


ModelOpt = Annotated[
    Optional[str],  # noqa: UP045 - typer 0.15 needs Optional on Python 3.10
    typer.Option(
        "--model",
        help="`package.module:function` that builds your model (not needed for the reference "
        "DLRM, whose config is stored in its checkpoint).",
    ),
]
AdapterOpt = Annotated[
    str,
    typer.Option(
        help="How batches reach the model: `features` (forward(batch_dict)), `dlrm` "
        "(facebookresearch/dlrm's DLRM_Net: dense_x, lS_o, lS_i from columns dense_*/cat_*), "
        "`torchrec`, or `auto` (recorded in the checkpoint or run, else detected; docs/dlrm.md)."
    ),
]
OutputOpt = Annotated[
    str,
    typer.Option(
        help="What the model returns: `logits`, `probs` (probabilities, e.g. a Sigmoid last), "
        "or `auto` (recorded, else decided on the first batch and printed)."
    ),
]
LabelOpt = Annotated[str, typer.Option(help="Name of the label column.")]
SeedOpt = Annotated[int, typer.Option(help="Random seed (parameter init and data order).")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]


def _echo_table(rows: list[list[str]]) -> None:
    typer.echo(format_table(rows))


@_command()
def train(
    data: Annotated[Path, typer.Argument(help="Training data (Parquet or CSV).")],
    valid: Annotated[Path, typer.Option(help="Validation data for AUC/logloss per epoch.")],
    out: Annotated[Path, typer.Option(help="Checkpoint to write (.safetensors).")],
    embedding_dim: Annotated[int, typer.Option(help="Embedding dim D of every table.")] = 16,
    epochs: Annotated[int, typer.Option(help="Passes over the data.")] = 3,
    batch_size: Annotated[
        int, typer.Option(help="Rows per step and process (torchrun: a step sees W x this).")
    ] = 1024,
    lr: Annotated[float, typer.Option(help="Adam learning rate.")] = 3e-3,
    label: LabelOpt = "label",
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Train the reference DLRM (fixed dimension) to get a baseline checkpoint.

    Example: amtl-compress train train.parquet --valid valid.parquet --out base.safetensors

    Data-parallel on N processes: torchrun --nproc_per_node=N -m amtl_compress train ...
    (docs/scaling.md).
    """
    with command_ranks(functools.partial(_report, interrupted=lambda: RERUN_TO_RESUME)) as world:
        with hold_interrupts():
            from amtl_compress.training.config import TrainConfig
            from amtl_compress.training.train import train_dlrm
        with world.errors_agreed():
            config = TrainConfig(
                embedding_dim=embedding_dim, epochs=epochs, batch_size=batch_size, lr=lr,
                seed=seed, label=label,
            )
        result = train_dlrm(data, valid, out, config, progress=not quiet)
        if world.is_main:
            typer.echo(
                f"wrote {out}: valid AUC {result['auc']:.4f}, logloss {result['logloss']:.4f}"
            )


@_command(interrupted=lambda out, **_: _interrupted_message(out))
def finetune(
    checkpoint: Annotated[Path, typer.Argument(help="Trained weights (.safetensors or .pt).")],
    data: Annotated[Path, typer.Option(help="Training data (Parquet or CSV).")],
    valid: Annotated[Path, typer.Option(help="Validation data; the best epoch is kept.")],
    out: Annotated[Path, typer.Option(help="Run directory to create.")],
    field: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            help="Table to compress: `MODULE=COLUMN`, or a bare name for both (repeatable). "
            "MODULE is a module path, a path suffix, a regex, or a template such as "
            "`emb_l.{i}=cat_{i}`. Default: the adapter's (`dlrm`: every emb_l.K=cat_K)."
        ),
    ] = None,
    model: ModelOpt = None,
    adapter: AdapterOpt = "auto",
    output: OutputOpt = "auto",
    target_ratio: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            help="Memory budget, kept values / (N*D) per table: `0.4` for every table, "
            "`TABLE=0.3` per table (repeatable; TABLE as in --field), or `auto` (a ratio per "
            "table from the truncation plan on --valid, see --max-auc-drop). None: the "
            "paper's loss, no budget."
        ),
    ] = None,
    max_auc_drop: Annotated[
        float,
        typer.Option(help="With --target-ratio auto: validation AUC each table's cut may lose."),
    ] = 0.002,
    budget_warmup: Annotated[
        float,
        typer.Option(
            help="Share of the steps over which the budget goes from 1 (nothing cut) to "
            "--target-ratio; epochs that end earlier do not meet the budget."
        ),
    ] = 0.1,
    epochs: Annotated[int, typer.Option(help="Passes over the data.")] = 3,
    batch_size: Annotated[
        int, typer.Option(help="Rows per step and process (torchrun: a step sees W x this).")
    ] = 1024,
    lr: Annotated[
        float, typer.Option(help="Learning rate of the embedding tables.")
    ] = 1e-2,
    dense_lr: Annotated[
        float,
        typer.Option(
            help="Learning rate of the model's other weights (MLPs); 0 keeps them as trained "
            "and fine-tunes the tables only."
        ),
    ] = 0.0,
    amtl_lr: Annotated[
        float, typer.Option(help="Initial learning rate of the AMTL layers (decays to 0).")
    ] = 3e-3,
    temperature: Annotated[float, typer.Option(help="Tempered-softmax T (Eq. 7).")] = 1.0,
    final_temperature: Annotated[
        Optional[float],  # noqa: UP045
        typer.Option(help="Anneal T geometrically to this value."),
    ] = None,
    ordering: Annotated[
        str,
        typer.Option(
            help="`pca`: rotate each table onto its principal axes first so the kept prefix "
            "holds the most information (docs/amtl.md); `none`: the paper's raw dims."
        ),
    ] = "pca",
    budget_weight: Annotated[
        float,
        typer.Option(
            help="Weight of the budget's price term in the loss (shortens rows the task does "
            "not use); 0 = price on the selection only."
        ),
    ] = 1.0,
    price_rule: Annotated[
        str,
        typer.Option(
            help="How a row's price on length follows its training count q: `log_count` keeps "
            "lengths ~ log2(2 + q)^gamma; `rank` spreads them e^(2 gamma)-fold by frequency "
            "rank (docs/amtl.md, \"Allocation follows frequency\")."
        ),
    ] = "log_count",
    price_scale: Annotated[
        float,
        typer.Option(help="gamma of --price-rule in [0, 10]; 0 = one price for every row."),
    ] = 2.0,
    single_branch: Annotated[
        bool, typer.Option("--single-branch", help="Ablation AML: one branch, no twins.")
    ] = False,
    no_ste: Annotated[
        bool, typer.Option("--no-ste", help="Ablation AMTL-nSTE: soft mask in the forward pass.")
    ] = False,
    counts: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Frequency counts file instead of counting --data (docs/data.md)."),
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue an interrupted run from `<out>.resume`.")
    ] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    save_every: Annotated[
        int, typer.Option(min=1, help="Optimiser steps between resumable-state saves.")
    ] = 200,
    label: LabelOpt = "label",
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Attach AMTL to the chosen tables of a trained model and fine-tune it (warm start).

    Example: amtl-compress finetune base.safetensors --data train.parquet --valid valid.parquet
    --field user_id --field item_id --target-ratio 0.4 --out runs/amtl1

    Data-parallel on N processes: torchrun --nproc_per_node=N -m amtl_compress finetune ...
    (docs/scaling.md).
    """
    report = functools.partial(_report, interrupted=lambda: _interrupted_message(out))
    with command_ranks(report) as world:
        with hold_interrupts():
            # Imported here, all at once, so that no later import can be cut short by Ctrl-C.
            import numpy  # noqa: F401
            import pyarrow.parquet  # noqa: F401
            import safetensors.torch  # noqa: F401

            from amtl_compress.core.amtl import AMTLConfig
            from amtl_compress.training.config import (
                FinetuneConfig,
                parse_field,
                parse_target_ratio,
            )
            from amtl_compress.training.finetune import finetune as run_finetune
            from amtl_compress.training.result import (
                BudgetWarning,
                CollapseWarning,
                UnseenRowsWarning,
            )
        with world.errors_agreed():
            config = FinetuneConfig(
                fields=dict(parse_field(f) for f in field or []), epochs=epochs,
                batch_size=batch_size, lr=lr, dense_lr=dense_lr, amtl_lr=amtl_lr,
                final_temperature=final_temperature,
                target_ratio=parse_target_ratio(target_ratio or []), max_auc_drop=max_auc_drop,
                budget_warmup=budget_warmup, seed=seed, label=label, save_every=save_every,
                budget_weight=budget_weight, amtl=AMTLConfig(
                    twins=not single_branch, straight_through=not no_ste,
                    temperature=temperature, ordering=ordering, price_rule=price_rule,
                    price_scale=price_scale,
                ),
            )
        with warnings.catch_warnings():
            # Reported below, once (rank 0), as `Warning: ...` lines.
            warnings.simplefilter("ignore", CollapseWarning)
            warnings.simplefilter("ignore", BudgetWarning)
            # Said when it arises (before training; finetune warns on rank 0 only).
            warnings.simplefilter("always", UnseenRowsWarning)
            warnings.showwarning = _show_as_cli_line(warnings.showwarning, UnseenRowsWarning)
            result = run_finetune(
                checkpoint, data, valid, out, config, model_factory=model, counts_file=counts,
                resume=resume, overwrite=overwrite, progress=not quiet, adapter=adapter,
                output=output,
            )
        if world.is_main:
            if result.metrics["collapsed"]:
                warning = CollapseWarning(result.metrics["collapsed"])
                typer.echo(f"Warning: {cli_message(str(warning), _option_names())}", err=True)
            if result.metrics["budget_met"] is False:
                best = result.metrics["best_epoch"]
                epoch = next(e for e in result.metrics["epochs"] if e["epoch"] == best)
                warning = BudgetWarning(
                    result.metrics["budget_missed"], best,
                    best > 0 and epoch["step"] < result.metrics["budget_warmup_steps"],
                )
                typer.echo(f"Warning: {cli_message(str(warning), _option_names())}", err=True)
            _print_finetune_metrics(result.metrics)
            typer.echo(f"wrote {result.run_dir}")
            if result.metrics.get("budget_summary"):  # last, where a reader looks for the verdict
                typer.echo(cli_message(result.metrics["budget_summary"], _option_names()))


def _show_as_cli_line(
    show: Callable[..., None], category: type[Warning]
) -> Callable[..., None]:
    """``warnings.showwarning`` that writes ``category`` as a one-line ``Warning: ...`` in the
    CLI's words, and anything else as ``show`` does."""

    def showwarning(message, kind, *args, **kwargs) -> None:  # noqa: ANN001 (warnings' API)
        if issubclass(kind, category):
            typer.echo(f"Warning: {cli_message(str(message), _option_names())}", err=True)
        else:
            show(message, kind, *args, **kwargs)

    return showwarning


def _interrupted_message(out: Path) -> str:
    """What an interrupted ``finetune`` tells: whether it left a state to resume from.

    Every import of the command runs under ``hold_interrupts``, which lets none be cut short,
    so importing run_dir (and torch) here never meets a half-imported module.
    """
    from amtl_compress.run_dir import STATE_FILE, resume_dir

    state = resume_dir(out)
    if (state / STATE_FILE).is_file():
        return (
            f"Interrupted; progress is saved in `{state}`: rerun the same command to resume "
            "(or add --no-resume to start over)"
        )
    return "Interrupted before the first saved step; nothing to resume."


def _print_finetune_metrics(metrics: dict) -> None:
    if metrics.get("model_output", {}).get("printed"):
        typer.echo(cli_message(metrics["model_output"]["note"], _option_names()))
    rows = [["", "AUC", "logloss"]]
    for name in ("before", "after"):
        m = metrics[name]
        rows.append([name, f"{m['auc']:.4f}", f"{m['logloss']:.4f}"])
    _echo_table(rows)
    typer.echo("")
    targets = metrics.get("target_ratios") or {}
    missed = metrics.get("budget_missed") or {}
    rows = [["table", "rows", "D", "avg kept dim", "memory ratio", "target", "budget"]]
    for path, t in metrics["tables"].items():
        target, verdict = "-", "-"
        if path in targets:
            target = f"{targets[path]:.3f}"
            gap = t["memory_ratio"] - targets[path]
            verdict = f"missed by {gap:+.3f}" if path in missed else "met"
        rows.append([path, str(t["rows"]), str(t["dim"]), f"{t['avg_kept_dim']:.2f}",
                     f"{t['memory_ratio']:.3f}", target, verdict])
    _echo_table(rows)


@_command()
def inspect(
    checkpoint: Annotated[Path, typer.Argument(help="Checkpoint (.safetensors or .pt).")],
    model: ModelOpt = None,
) -> None:
    """List a checkpoint's embedding tables: name, rows, dim, dtype, bytes.

    Example: amtl-compress inspect base.safetensors
    """
    from amtl_compress.checkpoint import SPEC_KEY, embedding_tables, load_model, load_state_dict

    state, metadata = load_state_dict(checkpoint)
    if model is not None or SPEC_KEY in metadata:
        source = load_model(checkpoint, model)[0]
    else:
        source = state
    rows = [["table", "kind", "rows", "dim", "dtype", "bytes"]]
    for t in embedding_tables(source):
        rows.append([t.name, t.kind, str(t.rows), str(t.dim), str(t.dtype).replace("torch.", ""),
                     str(t.bytes)])
    _echo_table(rows)


@_command()
def pack(
    run: Annotated[Path, typer.Argument(help="Run directory written by `finetune`.")],
    out: Annotated[Path, typer.Option(help="Packed directory to create.")],
    dtype: Annotated[
        str, typer.Option(help="Stored value type: float32, float16, bfloat16, int8 or int4.")
    ] = "float32",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing --out.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Strip the masked zeros of a fine-tuned run into a packed variable-length store.

    Example: amtl-compress pack runs/amtl1 --out packed/ --dtype int8
    """
    from amtl_compress.storage.pack import pack as run_pack

    report = run_pack(run, out, dtype=dtype, overwrite=overwrite, progress=not quiet)
    typer.echo(report.format_table())
    typer.echo(f"wrote {out}")


@_command()
def eval_(
    test: Annotated[Path, typer.Argument(help="Test data (Parquet or CSV).")],
    checkpoint: Annotated[
        Optional[Path], typer.Option(help="The original trained checkpoint.")  # noqa: UP045
    ] = None,
    run: Annotated[
        Optional[Path], typer.Option(help="A `finetune` run directory.")  # noqa: UP045
    ] = None,
    packed: Annotated[
        Optional[Path], typer.Option(help="A `pack` output directory.")  # noqa: UP045
    ] = None,
    model: ModelOpt = None,
    adapter: AdapterOpt = "auto",
    output: OutputOpt = "auto",
    label: LabelOpt = "label",
    device: Annotated[
        str, typer.Option(help="Where the models run: `cpu`, `cuda` or `cuda:N` (packed tables "
                          "on CUDA use the Triton lookup kernels).")
    ] = "cpu",
) -> None:
    """AUC and logloss on a test file of the checkpoint, the fine-tuned run and the packed model,
    side by side with the bytes of each on disk.

    Example: amtl-compress eval test.parquet --checkpoint base.safetensors --run runs/amtl1
    --packed packed/
    """
    from amtl_compress.evaluation import compare

    if checkpoint is None and run is None and packed is None:
        raise AmtlError("nothing to evaluate; pass --checkpoint, --run and/or --packed")
    rows = [["model", "AUC", "logloss", "bytes", "path"]]
    for r in compare(test, checkpoint, run, packed, factory=model, label=label,
                     adapter=adapter, output=output, device=device):
        rows.append([r.name, f"{r.auc:.4f}", f"{r.logloss:.4f}", str(r.bytes), str(r.path)])
    _echo_table(rows)


@_command()
def demo(
    out: Annotated[Path, typer.Option(help="Directory for the demo's files.")] = Path("runs/demo"),
    target_ratio: Annotated[float, typer.Option(help="Memory budget of AMTL.")] = 0.4,
    data_dir: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="A directory holding ml-100k.inter/.user/.item instead of fetching."),
    ] = None,
    seed: SeedOpt = 0,
    quiet: QuietOpt = False,
) -> None:
    """Train the reference DLRM on MovieLens-100k, fine-tune AMTL on user_id and item_id at a
    memory budget, and print a before/after table and the kept dims by training count.

    Example: amtl-compress demo --target-ratio 0.4
    """
    from amtl_compress.demo import run_demo

    tables = run_demo(out, target_ratio=target_ratio, data_dir=data_dir, seed=seed,
                      progress=not quiet)
    _echo_table(tables.comparison)
    typer.echo("")
    _echo_table(tables.kept_by_frequency)


@_command(interrupted=lambda **_: "Interrupted; nothing was written.")
def plan(
    checkpoint: Annotated[Path, typer.Argument(help="Trained weights (.safetensors or .pt).")],
    valid: Annotated[Path, typer.Option(help="Validation data to score (never the test split).")],
    field: Annotated[
        Optional[list[str]],  # noqa: UP045
        typer.Option(
            help="Table to plan: `MODULE=COLUMN`, or a bare name for both (repeatable), as in "
            "`finetune`. Default: the adapter's (`dlrm`: every emb_l.K=cat_K)."
        ),
    ] = None,
    model: ModelOpt = None,
    adapter: AdapterOpt = "auto",
    output: OutputOpt = "auto",
    ratios: Annotated[
        str, typer.Option(help="Comma-separated kept ratios to try, each in (0, 1]; 1 is added.")
    ] = "0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0",
    max_auc_drop: Annotated[
        float,
        typer.Option(help="Validation AUC a table may lose; the smallest ratio within it is "
                     "recommended."),
    ] = 0.002,
    plot: Annotated[
        Optional[Path],  # noqa: UP045
        typer.Option(help="Write the curves to this .svg file."),
    ] = None,
    batch_size: Annotated[int, typer.Option(help="Rows per evaluation batch.")] = 4096,
    label: LabelOpt = "label",
    quiet: QuietOpt = False,
) -> None:
    """Suggest a --target-ratio per table from the validation AUC of training-free truncation.

    Each table in turn is rotated onto its principal axes and cut to each kept ratio of the grid
    (no training); the smallest ratio within --max-auc-drop of the trained model's AUC is
    recommended. docs/planning.md explains the curve.

    Example: amtl-compress plan base.safetensors --valid valid.parquet --field user_id
    --field item_id --max-auc-drop 0.002 --plot plan.svg
    """
    from amtl_compress.planning import kept_dims, parse_ratios
    from amtl_compress.planning import plan as run_plan
    from amtl_compress.training.config import parse_field

    result = run_plan(
        checkpoint, valid, dict(parse_field(f) for f in field or []),
        ratios=parse_ratios(ratios),
        max_auc_drop=max_auc_drop, model_factory=model, batch_size=batch_size, label=label,
        plot=plot, progress=not quiet, adapter=adapter, output=output,
    )
    paths = list(result.curves)
    if result.output_note:
        typer.echo(cli_message(result.output_note, _option_names()))
    typer.echo("validation AUC, one table truncated at a time (1 = the trained model):")
    rows = [["ratio", *paths]]
    for i, (ratio, _) in enumerate(result.curves[paths[0]]):
        rows.append([_ratio_text(ratio)] + [
            f"{result.curves[p][i][1]:.4f}{'*' if result.recommended[p] == ratio else ''}"
            for p in paths
        ])
    _echo_table(rows)
    typer.echo("")
    typer.echo(f"recommended (*): the smallest ratio within {result.max_auc_drop:g} AUC of "
               f"{result.baseline_auc:.4f}:")
    rows = [["table", "D", "ratio", "kept dims", "AUC", "vs trained"]]
    for p in paths:
        ratio, dim = result.recommended[p], result.dims[p]
        auc = dict(result.curves[p])[ratio]
        rows.append([p, str(dim), _ratio_text(ratio), str(kept_dims(ratio, dim)), f"{auc:.4f}",
                     f"{auc - result.baseline_auc:+.4f}"])
    _echo_table(rows)
    typer.echo("")
    typer.echo(f"finetune with: {result.finetune_args()}")
    if result.plot is not None:
        typer.echo(f"wrote {result.plot}")


def _ratio_text(ratio: float) -> str:
    """0.1 -> "0.10", 1.0 -> "1.00", 0.125 -> "0.125": two decimals unless it has more."""
    return f"{ratio:.2f}" if round(ratio, 2) == ratio else f"{ratio:g}"


def main() -> None:
    """Console-script entry point."""
    app()
