"""docs/flags.md: the --help text of every script, as printed at 100 columns.

    python helptext.py           # rewrite docs/flags.md (what `make flags` runs)
    python helptext.py --check   # exit 1 if docs/flags.md differs from the live --help

tests/test_docs.py runs the check, so the page never drifts from the flags.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import benchmark
import evaluation
import export
import main_retrieval
import predict
import study
import synthetic
import training

FLAGS_PAGE = Path(__file__).resolve().parent / "docs" / "flags.md"
COLUMNS = "100"  # argparse wraps to the terminal: fixed here, so the page is the same anywhere
SCRIPTS: list[tuple[str, str, Callable[[list[str]], int]]] = [  # (script, what it does, main)
    ("synthetic.py", "synthetic data", synthetic.main),
    ("main_retrieval.py", "retrieval", main_retrieval.main),
    ("Train_deep_labv3+.py", "training", training.main),
    ("Test_deep_labV3+.py", "evaluation", evaluation.main),
    ("predict.py", "prediction", predict.main),
    ("export.py", "ONNX export", export.main),
    ("benchmark.py", "benchmark", benchmark.main),
    ("study.py", "resolution study", study.main),
]


@contextlib.contextmanager
def _as_script(script: str) -> Iterator[None]:
    """argparse takes the program name from sys.argv[0] and the width from COLUMNS."""
    argv0, columns = sys.argv[0], os.environ.get("COLUMNS")
    sys.argv[0], os.environ["COLUMNS"] = script, COLUMNS
    try:
        yield
    finally:
        sys.argv[0] = argv0
        if columns is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = columns


def help_text(script: str, main: Callable[[list[str]], int]) -> str:
    """What `python SCRIPT --help` prints."""
    out = io.StringIO()
    with _as_script(script), contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(["--help"])
    return out.getvalue()


def render() -> str:
    """The whole of docs/flags.md."""
    parts = ["# Flags of each script", "",
             "[Back to the README](../README.md). Every script prints these with `--help`; this "
             "page is written", "by `make flags` (`python helptext.py`) and a test keeps it "
             "equal to the live `--help`.", ""]
    for script, what, main in SCRIPTS:
        parts += [f"## {script} ({what})", "", "```text", help_text(script, main).rstrip("\n"),
                  "```", ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 if {FLAGS_PAGE.name} differs from the live --help")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if FLAGS_PAGE.read_text() != text:
            print(f"error: {FLAGS_PAGE} differs from the scripts' --help: run make flags",
                  file=sys.stderr)
            return 1
        return 0
    FLAGS_PAGE.write_text(text)
    print(f"wrote {FLAGS_PAGE}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
