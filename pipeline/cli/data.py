"""``pipeline synth`` and ``pipeline prepare``: the data stage from the command line."""

from __future__ import annotations

from pipeline.cli.args import add_command, fraction, non_negative_int, positive_float, share


def _variety_settings(value: str):
    """``--variety``: a preset name, or a YAML file of settings (or of ``domains``) -> Variety or list of Domain."""
    from pathlib import Path

    import yaml

    from pipeline.data.variety import PRESETS, load_settings
    from pipeline.errors import InputError

    if value in PRESETS:
        return PRESETS[value]
    path = Path(value)
    if not path.is_file():
        raise InputError("--variety", f"{value!r} is neither a preset ({', '.join(PRESETS)}) nor a YAML file")
    try:
        content = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise InputError(path, f"unreadable variety settings ({str(err).splitlines()[0]})") from None
    return load_settings({} if content is None else content, path)


def _cmd_synth(args) -> None:
    from pipeline.data.synth import HiddenTest, generate_dataset

    settings = _variety_settings(args.variety) if args.variety else None
    many = isinstance(settings, list)
    task_dir = generate_dataset(args.out, n_healthy=args.healthy, n_tumour=args.tumour, seed=args.seed,
                                spacing=args.spacing, workers=args.workers, progress=not args.quiet,
                                hidden_test=HiddenTest(args.hidden_test_labels, args.test_fraction)
                                if args.hidden_test_labels else None,
                                variety=None if many else settings, domains=settings if many else None)
    hidden = f"; hidden test labels in {args.hidden_test_labels}" if args.hidden_test_labels else ""
    print(f"wrote {task_dir}{hidden}")


def _cmd_prepare(args) -> None:
    from pipeline.common import SECTIONS
    from pipeline.data.dataset import PreprocessConfig
    from pipeline.data.prepare import prepare_data

    cfg = PreprocessConfig(modalities=args.modalities, image_size=args.image_size,
                           pixdim=(args.spacing,) * 3, min_brain_fraction=args.min_brain_fraction)
    prepared = prepare_data(args.dataset_dir, args.split_file, args.cache_dir, cfg, split_seed=args.split_seed,
                            workers=args.workers, progress=not args.quiet, split_method=args.split_method)
    counts = {s: len(prepared.split[s]) for s in SECTIONS}
    print(f"split {args.split_file}: {counts}; healthy-slice cache {prepared.cache_dir}")


def add_data_commands(sub) -> None:
    """``synth`` and ``prepare``."""
    p = add_command(sub, "synth", _cmd_synth, "write a synthetic BraTS-like dataset in the MSD Task01 layout")
    p.add_argument("--out", required=True, help="root folder; the data goes to OUT/Task01_BrainTumour")
    p.add_argument("--healthy", type=non_negative_int, default=8, help="subjects without tumour (default 8)")
    p.add_argument("--tumour", type=non_negative_int, default=16, help="subjects with a tumour (default 16)")
    p.add_argument("--seed", type=int, default=0, help="generator seed: same seed, same bytes (default 0)")
    p.add_argument("--spacing", type=positive_float, default=2.0, help="voxel size in mm (default 2.0; BraTS is 1.0)")
    p.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    p.add_argument("--hidden-test-labels", metavar="GT_DIR", default=None,
                   help="public-leaderboard dataset: list --test-fraction of the subjects as test images without "
                        "labels; their labels go to GT_DIR/labelsTs (keep GT_DIR and the seed to yourself)")
    p.add_argument("--test-fraction", type=fraction, default=0.2,
                   help="share of healthy and of tumour subjects held out with --hidden-test-labels (default 0.2)")
    p.add_argument("--variety", metavar="PRESET_OR_YAML", default=None,
                   help="variety settings (docs/generator.md): a preset, 'none' (the default data) or 'mixed' "
                        "(every axis), or a YAML file of settings or of 'domains' (default: none)")

    p = add_command(sub, "prepare", _cmd_prepare, "patient-level split + healthy-slice cache (what training reads)")
    p.add_argument("--dataset-dir", required=True, help="folder holding Task01_BrainTumour (or that folder)")
    p.add_argument("--split-file", required=True, help="split JSON: reused if it exists, written otherwise")
    p.add_argument("--cache-dir", required=True, help="where the slice cache goes")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--split-method", choices=["stratified", "random"], default="stratified",
                   help="a new split (an existing --split-file is reused): healthy and tumour subjects in every "
                        "section, or the first release's random draw (default stratified)")
    p.add_argument("--modalities", default="FLAIR", help="comma-separated, from FLAIR,T1w,T1gd,T2w (default FLAIR)")
    p.add_argument("--image-size", type=int, default=64, help="in-plane size in pixels (default 64)")
    p.add_argument("--spacing", type=positive_float, default=2.0, help="resampling voxel size in mm (default 2.0)")
    p.add_argument("--min-brain-fraction", type=share, default=0.15)
    p.add_argument("--workers", type=int, default=2)
