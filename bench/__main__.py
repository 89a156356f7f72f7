"""``python -m bench`` runs every benchmark; ``python -m bench import --rows N`` runs one."""

from __future__ import annotations

import argparse
from types import ModuleType

from bench import imports, load, metrics_cost

# name → a module with ``add_arguments(parser)`` and ``run(args)``; its docstring's first
# line is the help.
BENCHMARKS: dict[str, ModuleType] = {"import": imports, "load": load, "metrics": metrics_cost}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Conveyor's benchmarks: measurements, not tests."
    )
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK")
    for name, module in BENCHMARKS.items():
        summary = (module.__doc__ or name).strip().splitlines()[0]
        module.add_arguments(sub.add_parser(name, help=summary, description=summary))
    args = parser.parse_args(argv)
    if args.benchmark is None:
        for name, module in BENCHMARKS.items():  # each with its defaults
            module.run(parser.parse_args([name]))
        return
    BENCHMARKS[args.benchmark].run(args)


if __name__ == "__main__":
    main()
