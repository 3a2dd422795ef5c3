"""``mmgen chat``: the interleaved Gradio chat for a trained checkpoint."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    @app.command("chat")
    def chat_cmd(
        checkpoint: str = typer.Option(..., "--checkpoint", help="Checkpoint directory (an mmgen bundle)."),
        port: int = typer.Option(7860, "--port", help="Port to serve on."),
        host: str = typer.Option(
            "127.0.0.1", "--host", help="Interface to bind (0.0.0.0 for all; no public share links are ever made)."
        ),
        device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda."),
        detokenizer: str = typer.Option(
            None,
            "--detokenizer",
            help="Draw pictures with this diffusion detokenizer "
            "(a pipeline directory, or a folder of x1/ x2/); none: the image tokenizer's "
            "decoder. Default: the checkpoint's detokenizer/ when it has one.",
        ),
    ):
        """Serve a chat whose answers interleave text and generated images (Ctrl-C stops it).

        The answer is also an API endpoint, /chat, for gradio_client. The collapsed "speed" panel sets the
        generation pipeline's speed options; under each answer: forward passes, tokens/s and KV-cache bytes,
        and under each picture the decoder that drew it.

        \b
        Example:
            mmgen chat --checkpoint runs/quickstart/sft/final --port 7860
        """
        from mmgen.inference.chat_app import serve
        from mmgen.inference.detokenize import check_detok_options
        from mmgen.inference.pipeline import GenerationOptions
        from mmgen.models.bundle import check_bundle_dir

        check_bundle_dir(checkpoint)  # before gradio and the model load
        check_detok_options(GenerationOptions(detok_path=detokenizer or "auto"))

        serve(checkpoint, host=host, port=port, device=device, detokenizer=detokenizer)
