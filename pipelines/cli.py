"""The ``forecaster`` command line."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def _bench(args: argparse.Namespace) -> None:
    from forecaster.benchmark import M4_MODELS, bench_etth1, bench_m4_hourly

    if args.dataset == "m4-hourly":
        table = bench_m4_hourly(args.data_dir / "m4", args.models or list(M4_MODELS))
    else:
        horizons = tuple(args.horizons or (96, 336))
        table = bench_etth1(args.data_dir / "ett" / "ETTh1.csv", horizons, args.models)
    print(table.to_markdown(floatfmt=".3f"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="forecaster", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    bench = commands.add_parser("bench", help="train and score models on a reference data set")
    bench.add_argument("dataset", choices=["m4-hourly", "etth1"])
    bench.add_argument("--data-dir", type=Path, default=DEFAULT_DATA,
                       help="folder holding m4/ and ett/ (default: ../shared/data)")
    bench.add_argument("--models", nargs="+", help="subset of model names (default: all)")
    bench.add_argument("--horizons", nargs="+", type=int, help="ETTh1 horizons (default 96 336)")
    bench.set_defaults(run=_bench)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"forecaster {args.command}: {error}")


if __name__ == "__main__":
    main()
