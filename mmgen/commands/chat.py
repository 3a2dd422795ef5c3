"""``mmgen chat``: the interleaved Gradio chat for a trained checkpoint."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("chat")
    def chat_cmd(
        checkpoint: str = typer.Option(..., "--checkpoint", help="Checkpoint directory (an mmgen bundle)."),
        port: int = typer.Option(7860, "--port", help="Port to serve on."),
        host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (0.0.0.0 for all; no public "
                                                             "share links are ever made)."),
        device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda."),
    ):
        """Serve a chat whose answers interleave text and generated images (Ctrl-C stops it).

        The answer is also an API endpoint, /chat, for gradio_client.

        \b
        Example:
            mmgen chat --checkpoint runs/quickstart/sft/final --port 7860
        """
        from mmgen.inference.chat_app import serve
        from mmgen.models.bundle import check_bundle_dir

        check_bundle_dir(checkpoint)  # before gradio and the model load

        serve(checkpoint, host=host, port=port, device=device)
