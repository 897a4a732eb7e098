"""``pipeline benchmark`` and ``pipeline leaderboard init | submit | kit | submit-maps | verify | show | site``."""

from __future__ import annotations

from pathlib import Path

from pipeline.cli.args import (DEFAULT_LEADERBOARD, add_command, leaderboard_option, parse_assignments, set_option,
                               trust_flag)
from pipeline.common import SUPERVISION_LEVELS

METRIC_CHOICES = ["auprc", "auroc", "dice"]


def _cmd_benchmark(args) -> None:
    from pipeline.protocols import load_protocol, run_benchmark, validation_only
    from pipeline.bundle import quiet_logs
    from pipeline.leaderboard.ranking import show

    overrides = parse_assignments(args.set)
    protocol = load_protocol(args.protocol, overrides)
    with quiet_logs(args.quiet):
        runs = run_benchmark(args.protocol, args.results, args.leaderboard, progress=not args.quiet,
                             overrides=overrides, trust_expressions=args.trust_expressions,
                             ground_truth_dir=args.ground_truth)
    print(f"{len(runs)} runs under {Path(args.results) / protocol['id']}")
    if validation_only(protocol):
        print("validation-only study protocol: nothing submitted; table: python benchmarks/study_table.py "
              f"{Path(args.results) / protocol['id']}")
        return
    print(show(args.leaderboard, protocol_id=protocol["id"]))


def _protocol_binding(path, assignments) -> dict:
    from pipeline.protocols import load_protocol, protocol_for_submission

    return protocol_for_submission(load_protocol(path, parse_assignments(assignments)))


def _cmd_init(args) -> None:
    from pipeline.leaderboard.registry import register_protocol, registry_path

    record = register_protocol(args.leaderboard, _protocol_binding(args.protocol, args.set),
                               ground_truth_dir=args.ground_truth, review_ceiling=args.review_ceiling)
    print(f"{registry_path(args.leaderboard)}: protocol {record['id']} (hash {record['hash'][:12]}, dataset "
          f"{record['dataset_fingerprint']}, {len(record['split']['test'])} test subjects)")


def _cmd_submit(args) -> None:
    from pipeline.leaderboard.submission import submit

    binding = _protocol_binding(args.protocol, args.set) if args.protocol else None
    row = submit(args.run_dir, args.leaderboard, binding, ground_truth_dir=getattr(args, "ground_truth", None))
    print(f"submitted {row['method']} to {args.leaderboard}: AUROC {row['auroc']:.4f}, AUPRC {row['auprc']:.4f}, "
          f"Dice {row['dice']:.4f}")


def _cmd_kit(args) -> None:
    from pipeline.leaderboard.kit import write_kit

    manifest = write_kit(args.leaderboard, args.protocol_id, args.out)
    split = manifest["split"]
    print(f"{args.out}: kit of protocol {args.protocol_id} ({len(split['validation'])} validation and "
          f"{len(split['test'])} test subjects; test labels {manifest['test_labels']}); read {args.out}/SUBMITTING.md")


def _cmd_submit_maps(args) -> None:
    from pipeline.leaderboard.external import submit_maps

    row = submit_maps(args.maps_dir, args.leaderboard, args.protocol_id, args.method, args.supervision,
                      description=args.description, code_url=args.code_url, run_dir=args.run_dir,
                      ground_truth_dir=args.ground_truth)
    print(f"submitted {row['method']} (external maps) to {args.leaderboard}: AUROC {row['auroc']:.4f}, "
          f"AUPRC {row['auprc']:.4f}, Dice {row['dice']:.4f}; run folder {row['run_dir']}")


def _cmd_verify(args) -> None:
    from pipeline.bundle import quiet_logs
    from pipeline.verify import verify_row

    with quiet_logs(args.quiet):
        verdict, diffs = verify_row(args.leaderboard, args.row_id, tolerance=args.tolerance,
                                    ground_truth_dir=args.ground_truth, trust_expressions=args.trust_expressions)
    print(f"row {args.row_id}: {verdict}" + (f" ({'; '.join(diffs)})" if diffs else ""))


def _cmd_show(args) -> None:
    from pipeline.leaderboard.ranking import show

    print(show(args.leaderboard, protocol_id=args.protocol_id, metric=args.metric, html_path=args.html))


def _cmd_site(args) -> None:
    from pipeline.leaderboard.site import build_site

    print(f"wrote {build_site(args.csv, args.out, metric=args.metric)}")


def _ground_truth_option(parser, help: str) -> None:
    parser.add_argument("--ground-truth", metavar="GT_DIR", default=None, help=help)


def add_benchmark_command(sub) -> None:
    """``benchmark PROTOCOL``."""
    p = add_command(sub, "benchmark", _cmd_benchmark, "run a benchmark protocol (train, score, evaluate every entry), "
                                                      "submit to the leaderboard and print it")
    p.add_argument("protocol", help="protocol file, e.g. configs/benchmark/default.yaml")
    p.add_argument("--results", default="results", help="results root (default results/)")
    leaderboard_option(p)
    set_option(p, "dataset.dir=data/msd --set bundle.train_steps=100")
    _ground_truth_option(p, "hidden test labels of a public-leaderboard dataset (GT_DIR/labelsTs; the organiser's runs)")
    trust_flag(p)


def add_leaderboard_commands(sub) -> None:
    """``leaderboard init | submit | kit | submit-maps | verify | show | site``."""
    p = sub.add_parser("leaderboard", help="submit a run folder or show the ranked table")
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    q = add_command(actions, "init", _cmd_init, "bind the leaderboard to a protocol (its hash, data content and split)")
    q.add_argument("--protocol", required=True, help="protocol file, e.g. configs/benchmark/default.yaml")
    set_option(q)
    leaderboard_option(q)
    _ground_truth_option(q, "organiser's folder with the hidden test labels: a hidden-label dataset's protocol "
                            "is bound only with them")
    q.add_argument("--review-ceiling", type=float, default=None, metavar="AUPRC",
                   help="test AUPRC at or above which rows are held as 'needs review', not ranked (default 0.99)")
    q = add_command(actions, "submit", _cmd_submit, "recompute a run's metrics from its maps and append it")
    q.add_argument("run_dir")
    q.add_argument("--protocol", default=None, help="protocol file; needed only for the first submission under "
                                                    "its id (later ones are checked against the registered one)")
    set_option(q)
    leaderboard_option(q)
    _ground_truth_option(q, "organiser's folder with the hidden test labels (GT_DIR/labelsTs/<subject>.nii.gz)")
    q = add_command(actions, "kit", _cmd_kit, "write a participant's kit for a registered protocol: validation and "
                                              "test images, validation labels, map grids, SUBMITTING.md")
    q.add_argument("--protocol-id", required=True, help="a protocol registered on the leaderboard")
    q.add_argument("--out", required=True, help="kit folder (replaced whole)")
    leaderboard_option(q)
    q = add_command(actions, "submit-maps", _cmd_submit_maps, "submit maps made by any code: one <subject>.nii.gz "
                                                              "per validation and test subject of a registered protocol")
    q.add_argument("maps_dir", help="folder of <subject>.nii.gz float maps on the kit's grids")
    q.add_argument("--protocol-id", required=True, help="a protocol registered on the leaderboard")
    q.add_argument("--method", required=True, help="entry name (letters, digits, '._+-')")
    q.add_argument("--supervision", required=True, choices=list(SUPERVISION_LEVELS),
                   help="what the method learnt from: images only, or slice-level labels")
    q.add_argument("--description", default=None, help="one paragraph, shown on the site (at most 500 characters)")
    q.add_argument("--code-url", default=None, help="http(s) address of the method's code")
    q.add_argument("--run-dir", default=None, help="where the assembled run folder goes (default: "
                                                   "submissions/<protocol>/<method>-<id> beside the CSV)")
    leaderboard_option(q)
    _ground_truth_option(q, "organiser's folder with the hidden test labels (GT_DIR/labelsTs/<subject>.nii.gz)")
    q = add_command(actions, "verify", _cmd_verify, "re-run a pipeline row from its recorded settings and model "
                                                    "weights; mark it reproduced when the test metrics agree")
    q.add_argument("row_id", help="the row's 32-hex id (leaderboard CSV, first column)")
    q.add_argument("--tolerance", type=float, default=1e-6, help="largest absolute difference counted as equal "
                                                                 "(default 1e-6; other hardware may need more)")
    leaderboard_option(q)
    _ground_truth_option(q, "organiser's folder with the hidden test labels (GT_DIR/labelsTs/<subject>.nii.gz)")
    trust_flag(q)
    q = add_command(actions, "show", _cmd_show, "ranked table (Markdown) with 95 %% intervals and paired tests")
    leaderboard_option(q)
    q.add_argument("--protocol-id", default=None)
    q.add_argument("--metric", default="auprc", choices=METRIC_CHOICES)
    q.add_argument("--html", default=None, help="also write the table as HTML to this file")
    q = add_command(actions, "site", _cmd_site, "static site (opens from the file system): ranked tables, forest "
                                                "plots, one page per run")
    q.add_argument("--csv", "--leaderboard", dest="csv", default=DEFAULT_LEADERBOARD,
                   help=f"leaderboard CSV (default {DEFAULT_LEADERBOARD})")
    q.add_argument("--out", default=None, help="site folder, replaced whole (default: site/ beside the CSV)")
    q.add_argument("--metric", default="auprc", choices=METRIC_CHOICES, help="ranking metric")
