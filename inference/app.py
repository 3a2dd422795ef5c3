"""Recipe entry: serve the interleaved chat for a checkpoint.

    python inference/app.py --checkpoint runs/quickstart/sft/final --port 7860

Same as ``mmgen chat``; copy and edit this file to change the serving setup (host, device). The app
itself is :func:`mmgen.inference.chat_app.build_app`.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve the mmgen interleaved chat (Gradio).")
    parser.add_argument("--checkpoint", required=True, help="checkpoint directory (an mmgen bundle)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    args = parser.parse_args(argv)

    from mmgen.errors import MMGenError
    from mmgen.inference.chat_app import serve

    try:
        serve(args.checkpoint, host=args.host, port=args.port, device=args.device)
    except MMGenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
