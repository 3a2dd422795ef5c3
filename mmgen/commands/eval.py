"""``mmgen eval``: evaluation commands. ``eval_app`` is a typer sub-app so each suite adds its own
subcommand (``mmgen eval scene``, ``mmgen eval t2i``, ...) here."""

from __future__ import annotations

import json
from pathlib import Path

import typer

eval_app = typer.Typer(help="Evaluation: the ShapesWorld scene parser and benchmark suites.", no_args_is_help=True,
                       add_completion=False, rich_markup_mode=None)


@eval_app.command("scene")
def scene(
    images: list[Path] = typer.Argument(..., help="Image files to parse."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object per image instead of a line."),
):
    """Parse ShapesWorld images into scenes (shape, colour, size, cell); 'unparseable' with a reason otherwise.

    Example: mmgen eval scene out/sample_0.png out/sample_1.png --json
    """
    from PIL import Image, UnidentifiedImageError

    from mmgen.errors import MMGenError
    from mmgen.eval.scene_parser import parse_scene_report

    for path in images:
        if not path.is_file():
            raise MMGenError(f"image not found: {path} (give paths to image files)")
        try:
            with Image.open(path) as img:
                res = parse_scene_report(img)
        except (UnidentifiedImageError, OSError) as e:
            raise MMGenError(f"cannot read image {path}: {e}") from None
        if as_json:
            typer.echo(json.dumps({"image": str(path), **res.to_dict()}))
        elif res.scene is None:
            typer.echo(f"{path}: unparseable ({res.reason})")
        else:
            from mmgen.data.synthetic.text import caption

            typer.echo(f"{path}: {caption(res.scene, template=0)}")


def register(app: typer.Typer) -> None:
    app.add_typer(eval_app, name="eval")
