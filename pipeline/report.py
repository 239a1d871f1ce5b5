"""Stage `report`: the paper's tables and figures, regenerated from the evaluated runs.

    python -m pipeline.report --dataset cifar10 [--out DIR] [--no-mlflow] [--params FILE] [--set key=value ...]

Writes ``reports/<dataset>/`` (report.md, report.html with its figures embedded, the figures and
tables) from the DVC-tracked outputs of every (method, bits, seed) of the matrix, and logs it to
a ``report`` run of the dataset's MLflow experiment. What it holds and how: docs/report.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import paper
from .artifacts import not_replaceable, report_dir, tune_dir, write_atomic
from .config import Params, add_config_args, config_from_args
from .errors import ConfigError, PipelineError, run_main
from .precision_plots import EMPTY_BALL_RULE
from .report_figures import (
    KNN,
    figure_gradcam,
    figure_p_at_h,
    figure_p_at_n,
    figure_pr,
    figure_tsne,
    p_at_h_cells,
)
from .report_html import markdown_to_html
from .report_tables import (
    ABLATION,
    CELL_HEADER,
    MAP_KEY,
    RADIUS_KEY,
    Cell,
    Member,
    ReportError,
    ablation_bits,
    cell_columns,
    collect,
    csv_text,
    interval,
    members_of,
    metric,
    t_quantile,
    table5,
    table5_md,
    table6,
    table6_md,
)

# what the stage's callers and tests use, wherever it lives now
__all__ = [
    "MAP_KEY",
    "RADIUS_KEY",
    "metric",
    "t_quantile",
    "interval",
    "Cell",
    "Member",
    "ReportError",
    "collect",
    "build_report",
    "write_report",
    "main",
]

#: What a report folder holds (report.md and .html, its figures and tables): a folder with
#: anything else is not replaced (write_report)
REPORT_SUFFIXES = frozenset({".md", ".html", ".png", ".csv"})
#: Where evaluate logs its retrieval grid in the training's run (the report shows it)
GRID_ARTIFACT = "evaluation/retrieval_grid.png"


def gradcam_section(
    params: Params, dataset: str, members: Sequence[Member], out: Path, root: str | os.PathLike
) -> tuple[list[str], dict[str, Any]]:
    """Fig. 3 at Table 5's code length, or the sentence saying why it is not drawn."""
    from .codefiles import load_codes
    from .gradcam import compute

    bits = ablation_bits(params)
    print(f"Grad-CAM: {bits} bits", flush=True)
    first = members_of(members, params.train.methods[0], bits)[0]
    _, labels, index, _ = load_codes(first.codes_path)  # the query split's labels, the same for every member
    pair = compute(params, dataset, bits, labels, index, root)
    if isinstance(pair, str):
        print(f"Grad-CAM: not drawn: {pair}", flush=True)
        return [f"Grad-CAM heat maps with and without PFA (Fig 3): not drawn: {pair}.", ""], {
            "bits": bits,
            "missing": pair,
        }
    name = f"gradcam_{bits}.png"
    figure_gradcam(pair, out / name, dataset)
    (without, runs0, layer0), (with_, runs1, layer1) = zip(pair.methods, pair.runs, pair.layers)
    lines = [
        f"Grad-CAM heat maps with and without PFA (Fig 3), {bits} bits, seed {pair.seed}: {len(pair.images)} "
        f"query images (the first of each class, in query order), then where in each the activations of {without} "
        f"(without PFA, run {runs0}, {layer0}) and of "
        f"{with_} (with PFA, run {runs1}, {layer1}) push the hash layer towards the image's own code "
        "(Grad-CAM of sign(u)·u with the grad-cam package; each map scaled to [0, 1] on its own).",
        "",
        f"![Grad-CAM]({name})",
        "",
    ]
    return lines, {
        "bits": bits,
        "figure": name,
        "methods": pair.methods,
        "runs": pair.runs,
        "layers": pair.layers,
        "indices": pair.indices.tolist(),
    }


# ----------------------------------------------------------------------------- the report


def _tune_section(dataset: str, root: str | os.PathLike, out: Path) -> list[str]:
    summary = tune_dir(dataset, root) / "summary.md"
    table = tune_dir(dataset, root) / "summary.csv"
    if not summary.is_file():
        return [
            f"No search for {dataset} (tune/{dataset}/summary.md): "
            f"`dvc exp run -S 'tune.datasets=[{dataset}]'` runs one.",
            "",
        ]
    text = summary.read_text()
    pivots = text.split("## Trials, best first")[0].split("\n## ", 1)
    body = ("## " + pivots[1]) if len(pivots) > 1 else text
    if table.is_file():
        shutil.copy(table, out / "tune_summary.csv")
    return [
        f"From the tune stage's `{summary}` (validation mAP; the query set is not used):",
        "",
        body.replace("## ", "### ").strip(),
        "",
    ]


def _classes(params: Params, dataset: str) -> list[str] | None:
    try:  # the manifest as JSON (dpfah.data would import torch); the shards are no dependency: names are a nicety
        return list(json.loads((Path(params.shards_dir(dataset)) / "manifest.json").read_text())["classes"]) or None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def grid_section(
    params: Params, dataset: str, members: Sequence[Member], bits: int, out: Path
) -> tuple[list[str], list[str]]:
    """The retrieval grid (Fig 15) that evaluate drew for each method at ``bits`` and the first
    seed, fetched from its MLflow run (``evaluation/retrieval_grid.png``); where a method has
    none, why. Returns (report lines, figure names)."""
    from mlflow.tracking import MlflowClient

    from .console import quiet_libraries
    from .tracking import mlflow_errors, tracking_uri

    quiet_libraries()  # no download bar per grid
    seed = min(params.train.seeds)
    uri = tracking_uri(params)
    lines = [
        f"Retrieval grids (Fig 15), {bits} bits, seed {seed}: each method's top-{params.evaluate.grid_topk} "
        "by Hamming distance for a few queries, as its evaluation drew them (framed green: shares a label with "
        "the query; red: not).",
        "",
    ]
    names = []
    for m in params.train.methods:
        member = next(x for x in members_of(members, m, bits) if x.seed == seed)
        if not member.run_id:
            lines += [f"{m}: no grid: its run record names no MLflow run.", ""]
            continue
        name = f"grid_{m}_{bits}.png"
        try:
            with mlflow_errors(f"fetching the retrieval grid of run {member.run_id}", uri):
                fetched = MlflowClient(uri).download_artifacts(member.run_id, GRID_ARTIFACT, str(out / ".fetch"))
            shutil.move(fetched, out / name)
        except PipelineError as e:
            why = "evaluate.grid_queries is 0" if params.evaluate.grid_queries == 0 else str(e)
            lines += [f"{m}: no grid (run {member.run_id}): {why}.", ""]
            continue
        finally:
            shutil.rmtree(out / ".fetch", ignore_errors=True)
        names.append(name)
        lines += [f"{m} (run {member.run_id}):", "", f"![grid {m}]({name})", ""]
    return lines, names


def _tables_section(params: Params, dataset: str, members: Sequence[Member], out: Path) -> tuple[list[str], Any]:
    """Table 6 and Table 5, as CSV into ``out`` and as the report's lines; returns (lines, Table 6's rows,
    Table 5)."""
    methods, n = params.train.methods, len(params.train.seeds)
    map_label = f"mAP@{params.evaluate.map_at_label(dataset)}"
    rows6, best = table6(params, dataset, members)
    paper_cell = lambda r: "" if r["paper"] is None else r["paper"]  # noqa: E731
    write_atomic(
        out / "table6.csv",
        csv_text(
            ["method", "bits", *CELL_HEADER, "paper", "best_separated"],
            [[r["method"], r["bits"], *cell_columns(r["cell"]), paper_cell(r), int(r["best"])] for r in rows6],
        ),
    )
    ablation = table5(params, dataset, members)
    if ablation:
        write_atomic(
            out / "table5.csv",
            csv_text(
                ["row", "kind", *CELL_HEADER, "paper"],
                [[r["row"], r["kind"], *cell_columns(r["cell"]), paper_cell(r)] for r in ablation[1]],
            ),
        )
    lines = [
        f"## Table 6: query {map_label} by method and code length",
        "",
        *table6_md(params, rows6, map_label),
        "",
        f"† {paper.NOTE}; not comparable to these runs unless they used the paper profile and an ImageNet start. "
        "**Bold**: the best mean of a column, only where its interval lies wholly above the next method's"
        + (" (none can be with one seed)." if n < 2 else "."),
        "",
    ]
    unmarked = [str(b) for b, m in best.items() if m is None and len(methods) > 1]
    if unmarked and n > 1:
        lines += [f"No method is marked at {', '.join(unmarked)} bits: the top interval overlaps the next.", ""]
    lines += ["## Table 5: ablation", ""]
    if ablation:
        lines += [f"At {ablation[0]} bits; steps are paired differences over the same seeds.", ""]
        lines += [*table5_md(ablation[1]), ""]
        if dataset != "cifar10" or ablation[0] != paper.TABLE5_BITS:
            lines += ["† The paper's Table 5 is CIFAR-10 at 48 bits: no paper values here.", ""]
    else:
        lacking = ", ".join(m for m in ABLATION if m not in methods)
        lines += [
            f"Not run: train.methods lacks {lacking} (`dvc exp run -S 'train.methods=[{','.join(ABLATION)}]'`).",
            "",
        ]
    return lines, rows6, ablation


def _p_at_h_lines(params: Params, members: Sequence[Member], out: Path, dataset: str) -> tuple[list[str], list[str]]:
    """P@H<=radius against the code length (Fig 11): its CSV, and its figure with two or more
    code lengths, else the values and why there is no figure. Returns (lines, figures)."""
    radius, bits = params.evaluate.radius, sorted(params.bits)
    cells = p_at_h_cells(params, members)
    rows = [[m, b, *cell_columns(cells[(m, b)])] for m in params.train.methods for b in bits]
    write_atomic(out / "p_at_h.csv", csv_text(["method", "bits", *CELL_HEADER], rows))
    if len(bits) > 1:
        figure_p_at_h(params, cells, out / "p_at_h.png", dataset, radius)
        return [f"P@H<={radius} against the code length (Fig 11): ![p@h](p_at_h.png)", ""], ["p_at_h.png"]
    values = "; ".join(f"{m} {cells[(m, bits[0])].text(3)}" for m in params.train.methods)
    return [
        f"P@H<={radius} against the code length (Fig 11): not drawn: one code length ({bits[0]} bits) makes one "
        f"point per method, not a trend (`dvc exp run -S 'bits=[16,32,48,64]'` runs four). P@H<={radius} at "
        f"{bits[0]} bits: {values} (`p_at_h.csv`).",
        "",
    ], []


def _tsne_lines(tsne: dict[str, Any] | None, bits: int) -> list[str]:
    if not tsne:
        return ["t-SNE: not drawn (DPFAH is not in train.methods).", ""]
    agree = "; ".join(f"{m} {v:.3f}" for m, v in tsne["agreement"].items())
    chosen = f" (chosen as {tsne['baseline_chosen_by']})" if tsne["baseline"] else ""
    return [
        f"t-SNE of the query codes (Fig 7), {bits} bits, seed {tsne['seed']}: DPFAH and "
        f"{tsne['baseline'] or 'no baseline'}{chosen}. {KNN}-NN label agreement in Hamming space (share of each "
        f"query's {KNN} nearest other queries sharing a label): {agree}.",
        "",
        f"![t-SNE](tsne_{bits}.png)",
        "",
    ]


def build_report(params: Params, dataset: str, out: Path, root: str | os.PathLike = ".") -> dict[str, Any]:
    """Every table and figure into ``out`` (an empty directory), report.md and report.html last;
    returns what was computed."""
    members = collect(params, dataset, root)
    map_label = f"mAP@{params.evaluate.map_at_label(dataset)}"
    methods, bits_list, seeds = params.train.methods, list(params.bits), params.train.seeds
    t0 = time.perf_counter()
    n = len(seeds)
    lines = [
        f"# Report: {dataset}",
        "",
        f"Methods {', '.join(methods)}; code lengths {', '.join(map(str, bits_list))}; training seeds "
        f"{', '.join(map(str, seeds))} ({len(members)} evaluated trainings). Query {map_label}; intervals are 95 % "
        f"Student t over the seeds (mean ± t(0.975, n-1)·s/√n, n = {n})"
        f"{'' if n > 1 else ': with one seed there is no interval'}. Read from the DVC-tracked stage outputs "
        "(metrics, curve data, query codes, run records); nothing here is selected on the query set.",
        "",
    ]
    table_lines, rows6, ablation = _tables_section(params, dataset, members, out)
    lines += table_lines + ["## Figures", ""]
    figures = []
    for b in bits_list:
        print(f"figures: {b} bits", flush=True)
        figure_pr(params, members, b, out / f"pr_{b}.png", dataset, params.evaluate.radius)
        figure_p_at_n(params, members, b, out / f"p_at_n_{b}.png", dataset)
        figures += [f"pr_{b}.png", f"p_at_n_{b}.png"]
        lines += [
            f"PR curves ({b} bits, paper Figs 8-10): ![pr {b}](pr_{b}.png)",
            "",
            f"Markers: the radii r = 0 .. 4 (r = {params.evaluate.radius} larger: P@H<={params.evaluate.radius}); "
            f"precision from 0 to 1 in every figure. {EMPTY_BALL_RULE}",
            "",
            f"P@N ({b} bits, Figs 12-14): ![p@n {b}](p_at_n_{b}.png)",
            "",
        ]
    ph_lines, ph_figures = _p_at_h_lines(params, members, out, dataset)
    lines += ph_lines
    figures += ph_figures
    tsne_bits = max(bits_list)
    print(f"t-SNE: {tsne_bits} bits", flush=True)
    tsne = figure_tsne(params, members, tsne_bits, out / f"tsne_{tsne_bits}.png", dataset, _classes(params, dataset))
    if tsne:
        figures.append(f"tsne_{tsne_bits}.png")
    lines += _tsne_lines(tsne, tsne_bits)
    grid_lines, grids = grid_section(params, dataset, members, tsne_bits, out)
    lines += grid_lines
    figures += grids
    gradcam_lines, gradcam = gradcam_section(params, dataset, members, out, root)
    if "figure" in gradcam:
        figures.append(gradcam["figure"])
    lines += gradcam_lines
    lines += ["## Tables 3-4: the tune grid", ""] + _tune_section(dataset, root, out)
    markdown = "\n".join(lines)
    write_atomic(out / "report.md", markdown)
    write_atomic(out / "report.html", markdown_to_html(markdown, out, f"Report: {dataset}"))
    return {
        "members": len(members),
        "table6": rows6,
        "table5": ablation,
        "figures": figures,
        "grids": grids,
        "tsne": tsne,
        "gradcam": gradcam,
        "seconds": time.perf_counter() - t0,
    }


def write_report(
    params: Params, dataset: str, out_dir: str | os.PathLike | None = None, root: str | os.PathLike = "."
) -> tuple[Path, dict[str, Any]]:
    """Build the report beside ``out_dir`` and swap it into place: a failure leaves the
    previous report as it was."""
    out = Path(out_dir) if out_dir is not None else report_dir(dataset, root)
    why = not_replaceable(
        out, lambda e: e.is_file() and e.suffix in REPORT_SUFFIXES, what="a report", marker="report.md"
    )
    if why:
        raise ConfigError(
            f"--out {out}: {why}; a report is written only to a new or empty folder or over a report "
            "(nothing else is replaced)"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        result = build_report(params, dataset, tmp, root)
        if out.exists():
            out.rename(old)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out, result


def log_report(params: Params, dataset: str, out: Path, result: dict[str, Any]) -> str:
    """The report folder as a ``report`` run of the dataset's experiment; returns its id."""
    import mlflow

    from .tracking import git_commit, tracked_run, tracking_uri

    name = f"report-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    with tracked_run(tracking_uri(params), f"{params.mlflow.experiment}-{dataset}", name) as run:
        mlflow.set_tags({"kind": "report", "dataset": dataset, "git_commit": git_commit()})
        mlflow.log_params(
            {
                "methods": ",".join(params.train.methods),
                "bits": ",".join(map(str, params.bits)),
                "seeds": ",".join(map(str, params.train.seeds)),
            }
        )
        mlflow.log_metrics({f"map.{r['method']}.{r['bits']}b": r["cell"].mean for r in result["table6"]})
        mlflow.log_artifacts(str(out), artifact_path="report")
        return run.info.run_id


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.report",
        description="The paper's tables and figures from the evaluated trainings of a dataset (every method of "
        "train.methods x bits x train.seeds): Table 6 (query mAP, mean and 95 %% t interval over seeds, the paper's "
        "value beside), Table 5 (the ablation's paired steps), PR and P@N curves, P@H<=2 against the code length, a "
        "t-SNE of query codes, the retrieval grids, Grad-CAM heat maps with and without PFA, the tune grid. Writes "
        "reports/<dataset>/ (report.md, and report.html with the figures embedded) and logs it to a report run in "
        "MLflow.",
        epilog="Reads the DVC-tracked outputs of evaluate (and train's run records, tune's summary); for the Grad-CAM "
        "figure also two trained models from MLflow and a few query images of the shards. A missing "
        "(method, bits, seed) is an error naming it: run `dvc repro` first.",
    )
    parser.add_argument("--dataset", required=True, help="dataset name from params.yaml")
    parser.add_argument(
        "--out",
        metavar="DIR",
        default=None,
        help="where the report goes (default: reports/<dataset>): new, empty, or a report, which is replaced; "
        "any other folder is refused, never deleted",
    )
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the report to MLflow")
    add_config_args(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    params = config_from_args(args)
    if not args.no_mlflow:
        from .tracking import check_store, tracking_uri

        check_store(tracking_uri(params), create=True)  # seconds, before any work
    out, result = write_report(params, args.dataset, args.out)
    logged = "" if args.no_mlflow else f"; MLflow run {log_report(params, args.dataset, out, result)}"
    print(
        f"report of {result['members']} evaluated trainings: {out / 'report.md'} ({out / 'report.html'} with its "
        f"{len(result['figures'])} figures embedded){logged}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
