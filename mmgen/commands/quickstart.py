"""`mmgen quickstart`: the whole life cycle on the tiny preset."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    from mmgen.quickstart import QuickstartConfig  # light: its stages import their libraries when they run

    @app.command("quickstart")
    def quickstart_cmd(
        out: str = typer.Option("runs/quickstart", "--out", help="output folder (stages resume from here)"),
        docs: int = typer.Option(QuickstartConfig.docs, help="ShapesWorld documents to generate"),
        seed: int = typer.Option(0, help="world seed"),
        launcher: str = typer.Option("deepspeed", help="deepspeed (training/pretrain.sh) or none (in-process)"),
        overrides: list[str] | None = typer.Argument(None, help="quickstart config overrides, key=value"),
    ) -> None:
        """Run world -> filter -> tokenizer -> code shards -> DeepSpeed pretraining -> generation -> report.

        Example: mmgen quickstart --out runs/quickstart

        Rerunning with the same --out skips stages that finished. Overrides reach the recipes, e.g.
        mmgen quickstart train_overrides='[steps=50]' eval_prompts=16
        """
        from mmgen.config import apply_overrides, from_dict
        from mmgen.quickstart import QuickstartConfig, quickstart

        data = apply_overrides({"out": out, "docs": docs, "seed": seed, "launcher": launcher}, overrides or [])
        report = quickstart(from_dict(QuickstartConfig, data))
        import json

        r = json.loads((report.parent / "report.json").read_text())
        print(f"\nreport: {report}  (grids: {report.parent / 'eval'})")
        figures = [
            (name, r.get(key))
            for name, key in (
                ("t2i_accuracy", "t2i_accuracy"),
                ("held-out compositions", "t2i_accuracy_heldout_compositions"),
                ("qa_accuracy", "qa_accuracy"),
                ("interleaved_accuracy", "interleaved_accuracy"),
            )
        ]
        rec = r.get("inner_tokenizer_reconstruction") or r.get("tokenizer_reconstruction")
        figures.append(("image tokenizer scene agreement", rec and rec["scene_agreement"]))
        print(", ".join(f"{name} {value:.3f}" for name, value in figures if value is not None))
        print(
            f"chat with the model: mmgen chat --checkpoint {r['checkpoint']}   "
            f"(or: .venv/bin/mmgen chat --checkpoint {r['checkpoint']}, then open http://127.0.0.1:7860)"
        )
