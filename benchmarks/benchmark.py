"""Measure train.py against the lab recipe and the bare model, side by side, on one machine.

    python -m benchmarks.benchmark cpu --model "$MODEL" --data ../shared/data/imdb
    python -m benchmarks.benchmark cpu --quick --model TINY --data FOLDER   # under 2 minutes
    python -m benchmarks.benchmark lengths --model "$MODEL" --data ../shared/data/imdb
    python -m benchmarks.benchmark levers --model "$MODEL" --data ../shared/data/imdb
    python -m benchmarks.benchmark gpu                                       # an H100/H200

The entry point of every benchmark; each lives in a module of its own:

* ``cpu`` (``cpu_comparison.py``): the lab recipe (``lab_recipe.py``), train.py with its
  defaults and the bare model (the compute ceiling), each as its own process, interleaved;
  medians and a Markdown table. ``bare`` and ``tokenize`` are the pieces it starts as processes.
* ``lengths`` (``lengths.py``): ``--group-by-length`` at long sequence lengths.
* ``levers`` (``levers.py``): each speed lever against the default.
* ``gpu`` (``gpu_benchmark.py``): random-weight bert-base, bf16, on a GPU.

What they share (train.py's defaults, timing, processes, report sections) is in ``common.py``.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Callable
from dataclasses import dataclass

# The Hugging Face libraries read this once, when they are first imported: it must be set
# before the imports below.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from benchmarks import cpu_comparison, gpu_benchmark, lengths, levers
from machinery.cli import quiet_library_logs


@dataclass(frozen=True)
class Subcommand:
    """One benchmark command: its one-line help, its --help text, its flags and what it runs."""

    help: str
    description: str | None
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], object]


# In the order `--help` lists them.
SUBCOMMANDS = {
    "cpu": Subcommand("recipe vs train.py vs bare model on this CPU",
                      cpu_comparison.cpu_command.__doc__, cpu_comparison.add_cpu_arguments,
                      cpu_comparison.cpu_command),
    "lengths": Subcommand("--group-by-length at long sequences", lengths.lengths_command.__doc__,
                          lengths.add_lengths_arguments, lengths.lengths_command),
    "bare": Subcommand("(a piece of cpu) the bare model's throughput",
                       cpu_comparison.bare_command.__doc__, cpu_comparison.add_bare_arguments,
                       cpu_comparison.bare_command),
    "tokenize": Subcommand("(a piece of cpu) one tokenization pass",
                           cpu_comparison.tokenize_command.__doc__,
                           cpu_comparison.add_tokenize_arguments,
                           cpu_comparison.tokenize_command),
    "levers": Subcommand("each speed lever against the default", "See benchmarks/levers.py.",
                         levers.add_levers_arguments, levers.levers_command),
    "gpu": Subcommand("random-weight bert-base, bf16, on a GPU",
                      "See benchmarks/gpu_benchmark.py.", gpu_benchmark.add_gpu_arguments,
                      gpu_benchmark.gpu_command),
}


def build_parser() -> argparse.ArgumentParser:
    """The benchmark's command line: cpu, lengths, levers, gpu, and the pieces bare and
    tokenize."""
    parser = argparse.ArgumentParser(
        description="Benchmark train.py against the lab recipe (HF Trainer) and the bare "
                    "model. See BENCHMARKS.md.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parser.set_defaults(command_line=command_line(None))  # main() records its own argv
    for name, command in SUBCOMMANDS.items():
        command.add_arguments(commands.add_parser(name, help=command.help,
                                                  description=command.description))
    return parser


def command_line(argv: list[str] | None) -> str:
    """The command that ran the benchmark with `argv` (None: this process's arguments)."""
    return "python -m benchmarks.benchmark " + shlex.join(sys.argv[1:] if argv is None else argv)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.benchmark``."""
    args = build_parser().parse_args(argv)
    args.command_line = command_line(argv)
    quiet_library_logs()
    SUBCOMMANDS[args.command].run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
