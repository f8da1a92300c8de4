"""The `lorasp-edge` command: parse, call one library function per subcommand, print.

    lorasp-edge plan      what fits in a memory budget        -> plan.json
    lorasp-edge train     LoRA-SP fine-tuning within a plan   -> adapter + checkpoints
    lorasp-edge export    merge + verified ONNX               -> merged HF model + model.onnx
    lorasp-edge generate  run an exported model with onnxruntime

Errors in the user's input print one line and exit non-zero (2: bad input, 3: over the memory
budget, 4: export verification failed); they never print a traceback.
"""

from __future__ import annotations

import argparse
import sys

from lorasp_edge.errors import UserError


class _Parser(argparse.ArgumentParser):
    """argparse, with a one-line error instead of usage + error."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


# ---------------------------------------------------------------------------------------- plan


def _add_plan(subparsers) -> None:
    parser = subparsers.add_parser("plan", help="choose a fine-tuning setting that fits a memory budget")
    parser.set_defaults(run=_run_plan)


def _run_plan(args) -> int:
    raise UserError("plan: not available yet")


# --------------------------------------------------------------------------------------- train


def _add_train(subparsers) -> None:
    parser = subparsers.add_parser("train", help="fine-tune with LoRA-SP within a memory plan")
    parser.set_defaults(run=_run_train)


def _run_train(args) -> int:
    raise UserError("train: not available yet")


# -------------------------------------------------------------------------------------- export


def _add_export(subparsers) -> None:
    parser = subparsers.add_parser("export", help="merge an adapter and export a verified ONNX model")
    parser.set_defaults(run=_run_export)


def _run_export(args) -> int:
    raise UserError("export: not available yet")


# ------------------------------------------------------------------------------------ generate


def _add_generate(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate text with an exported model (onnxruntime)")
    parser.set_defaults(run=_run_generate)


def _run_generate(args) -> int:
    raise UserError("generate: not available yet")


# ---------------------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="lorasp-edge",
        description="Fine-tune language models on the hardware you have: plan -> train -> export -> generate.",
    )
    from lorasp_edge import __version__

    parser.add_argument("--version", action="version", version=f"lorasp-edge {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _add_plan(subparsers)
    _add_train(subparsers)
    _add_export(subparsers)
    _add_generate(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except UserError as error:
        print(f"lorasp-edge {args.command}: error: {error}", file=sys.stderr)
        return error.exit_code
    except KeyboardInterrupt:
        print(f"lorasp-edge {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
