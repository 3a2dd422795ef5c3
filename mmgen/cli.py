"""The ``mmgen`` command.

Each stage's subcommand lives in ``mmgen/commands/<stage>.py`` as a ``register(app)`` function that
adds thin typer wrappers around the stage's Python function (imported lazily inside the command, so
``mmgen --help`` stays fast). Errors caused by the user's input are :class:`MMGenError` and are printed
as one line, ``error: ...``, with exit status 2.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from mmgen.errors import MMGenError

# Subcommand modules, in the order `mmgen --help` lists them (the life cycle of a model).
COMMAND_MODULES = [
    "world",
    "convert",
    "fetch",
    "train_quality",
    "filter",
    "clip",
    "tokenizer",
    "audio_tokenizer",
    "detokenizer",
    "train",
    "generate",
    "eval",
    "chat",
    "quickstart",
]

app = typer.Typer(
    name="mmgen",
    help="Unified multimodal models: data, tokenizers, training, inference, chat and evaluation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def _root() -> None:
    """Unified multimodal models: data, tokenizers, training, inference, chat and evaluation."""
    # A callback keeps `mmgen` a command group even while only one stage is registered
    # (typer otherwise collapses a one-command app into that command, and `mmgen convert ...` breaks).


def _register_all() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"mmgen.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"mmgen.commands.{name}":
                continue  # a stage not built yet
            raise
        module.register(app)


_register_all()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(args=argv, standalone_mode=False)
    except MMGenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # typer/click exit codes (--help, usage errors)
        return int(e.code or 0)
    except Exception as e:  # click's usage errors arrive here with standalone_mode=False
        import click

        # typer >= 0.2x raises its vendored click's exceptions, not click's own.
        vendored = getattr(getattr(typer, "_click", None), "exceptions", None)
        usage = tuple(c for c in (click.exceptions.ClickException, getattr(vendored, "ClickException", None)) if c)
        abort = tuple(c for c in (click.exceptions.Abort, getattr(vendored, "Abort", None)) if c)
        if isinstance(e, usage):
            e.show()
            return e.exit_code
        if isinstance(e, abort):
            return 1
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
