"""Inference: interleaved generation under the grid constraint, classifier-free guidance, the chat app.

Import from the submodules (``mmgen.inference.generate``, ``.constraints``, ``.chat_app``): each pulls
in transformers or gradio, which ``mmgen --help`` should not pay for."""
