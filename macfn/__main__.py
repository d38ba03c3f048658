"""Command line of macfn: ``python -m macfn demo [options]``."""

from __future__ import annotations

import argparse
import sys
import textwrap
from collections.abc import Sequence


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected an integer >= 1") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {value}: expected an integer >= 1")
    return value


def _seed(text: str) -> int:
    from macfn.demo._options import MAX_SEED

    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected an integer in [0, {MAX_SEED}]") from None
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"invalid value {value}: expected an integer in [0, {MAX_SEED}]")
    return value


def build_parser() -> argparse.ArgumentParser:
    """Build the ``macfn`` argument parser with its ``demo`` subcommand."""
    from macfn.demo import DEFAULT_OUT, DEFAULT_TASK, DEFAULT_THREADS, TASKS
    from macfn.demo._options import DEVICE_CHOICES

    parser = argparse.ArgumentParser(
        prog="python -m macfn",
        description="macfn: MAC (Mean Activation approximated Curvature) as a functional PyTorch optimizer.",
        epilog="Run 'python -m macfn COMMAND --help' for the options of a command.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    task_lines = "\n".join(
        textwrap.fill(
            f"{task.name:<8} {task.summary} (default {task.default_epochs} epochs)",
            width=88,
            initial_indent="  ",
            subsequent_indent=" " * 11,
        )
        for task in TASKS.values()
    )
    demo = commands.add_parser(
        "demo",
        help="train small models with MAC, SGD and AdamW and compare them",
        description=textwrap.fill(
            "Train small models with MAC, torch.optim.SGD (momentum) and torch.optim.AdamW from the same "
            "initial weights on the same batches, print a table of the results, and write a plot of the "
            "loss against training time with the table as CSV and JSON.",
            width=88,
        )
        + "\n\ntasks:\n"
        + task_lines,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    demo.add_argument(
        "--task",
        choices=sorted(TASKS),
        default=DEFAULT_TASK,
        help=f"which task to train (default: {DEFAULT_TASK})",
    )
    demo.add_argument(
        "--epochs",
        type=_positive_int,
        metavar="N",
        help="passes over the training data per run, an integer >= 1 (default: the task's own, see above)",
    )
    demo.add_argument(
        "--out",
        default=DEFAULT_OUT,
        metavar="DIR",
        help="folder for TASK.png, TASK.csv and TASK.json, created if missing (default: %(default)s)",
    )
    demo.add_argument(
        "--device",
        choices=DEVICE_CHOICES,
        default="auto",
        help="device to train on; auto picks cuda when a GPU is visible, else cpu (default: %(default)s)",
    )
    demo.add_argument(
        "--seed",
        type=_seed,
        default=0,
        metavar="N",
        help="seed of the data split, the initial weights and the batch order (default: %(default)s)",
    )
    demo.add_argument(
        "--threads",
        type=_positive_int,
        default=DEFAULT_THREADS,
        metavar="N",
        help="CPU threads PyTorch uses inside each operation while training, an integer >= 1 (default: %(default)s)",
    )
    demo.add_argument(
        "--quiet",
        action="store_true",
        help="hide the progress bar; the table is still printed (the bar is also hidden when stderr is not a "
        "terminal)",
    )
    demo.set_defaults(usage_error=demo.error)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status.

    Invalid options end the program through ``argparse`` with status 2 and a message on stderr.
    """
    parser = build_parser()
    args = parser.parse_args(argv)

    from macfn.demo import make_options, run_task

    try:
        options = make_options(
            args.task, epochs=args.epochs, out=args.out, device=args.device, seed=args.seed, quiet=args.quiet,
            threads=args.threads,
        )
    except ValueError as error:
        args.usage_error(str(error))
    result = run_task(options)
    print(result.text)
    print()
    print("Wrote " + ", ".join(str(path) for path in result.files.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
