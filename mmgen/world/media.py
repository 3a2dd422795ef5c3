"""ShapesWorld media: short videos (a shape moving, growing or changing colour) and spoken captions."""

from __future__ import annotations

import functools
import io
import random
import shutil
import subprocess

import numpy as np

from mmgen.errors import MMGenError
from mmgen.world.scene import (
    BACKGROUNDS,
    COLORS,
    HELDOUT_PAIRS,
    POSITIONS,
    SIZES,
    Obj,
    Scene,
    pairs_allowed,
    placement,
    render_objects,
)
from mmgen.world.text import object_phrase

VIDEO_CODECS = ("libx264", "mpeg4", "libvpx")  # first one the installed PyAV can encode wins
VIDEO_FPS = 8


@functools.lru_cache(maxsize=1)
def video_codec() -> str:
    import av

    for name in VIDEO_CODECS:
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # noqa: BLE001 - PyAV raises codec-specific errors for missing encoders
            continue
    raise MMGenError(
        f"no video encoder among {', '.join(VIDEO_CODECS)} in this PyAV build: "
        f"install a PyAV wheel with FFmpeg encoders (pip install av)"
    )


def encode_mp4(frames: list, fps: int = VIDEO_FPS) -> bytes:
    """PIL RGB frames -> mp4 bytes. Single-threaded and without timestamps in the container, so
    the same frames always give the same bytes."""
    import av

    codec = video_codec()
    buf = io.BytesIO()
    w, h = frames[0].size
    with av.open(buf, "w", format="mp4") as box:
        stream = box.add_stream(codec, rate=fps)
        stream.width, stream.height = w - w % 2, h - h % 2  # yuv420p needs even sides
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "veryfast", "tune": "zerolatency"}
        elif codec == "mpeg4":
            stream.codec_context.qscale = 2
        for img in frames:
            frame = av.VideoFrame.from_image(img.crop((0, 0, stream.width, stream.height)))
            for packet in stream.encode(frame):
                box.mux(packet)
        for packet in stream.encode():
            box.mux(packet)
    return buf.getvalue()


def make_motion(rng: random.Random, split: str) -> tuple[Scene, Scene, dict, str]:
    """A one-object motion clip: (start scene, end scene, motion facts, description)."""
    bg = rng.choice(list(BACKGROUNDS))
    pairs = pairs_allowed(split)
    if split == "heldout":
        pairs = sorted(HELDOUT_PAIRS)
    color, shape = rng.choice(pairs)
    kind = rng.choice(["move", "grow", "shrink", "recolor"])
    cell = rng.choice(list(POSITIONS))
    size = "large" if kind == "shrink" else "small" if kind == "grow" else rng.choice(list(SIZES))
    start = Obj(shape, color, size, cell)
    if kind == "move":
        end = Obj(shape, color, size, rng.choice([c for c in POSITIONS if c != cell]))
        text = f"{object_phrase(start).capitalize()} moves to the {POSITIONS[end.cell]}, on a {bg} background."
    elif kind in ("grow", "shrink"):
        end = Obj(shape, color, "large" if kind == "grow" else "small", cell)
        verb = "grows" if kind == "grow" else "shrinks"
        text = f"{object_phrase(start).capitalize()} {verb}, on a {bg} background."
    else:
        colors = [c for c in COLORS if c != color and (c, shape) in pairs_allowed(split)]
        end = Obj(shape, rng.choice(colors), size, cell)
        text = f"{object_phrase(start).capitalize()} turns {end.color}, on a {bg} background."
    return Scene(bg, [start]), Scene(bg, [end]), {"motion": kind}, text


def render_motion(start: Scene, end: Scene, n_frames: int, width: int = 64, height: int = 64) -> list:
    """Frames interpolating one object's position, size and colour (linearly, in pixels and RGB);
    the first frame shows ``start`` and the last ``end`` exactly."""
    a, b = start.objects[0], end.objects[0]
    pa, pb = placement(a, width, height), placement(b, width, height)
    ca, cb = np.array(COLORS[a.color], float), np.array(COLORS[b.color], float)
    frames = []
    for i in range(n_frames):
        t = i / (n_frames - 1)
        rgb = tuple(int(round(v)) for v in (1 - t) * ca + t * cb)
        cx, cy, side = ((1 - t) * pa[k] + t * pb[k] for k in (2, 3, 4))
        frames.append(render_objects(start.background, [(a.shape, rgb, cx, cy, side)], width, height))
    return frames


def speak(text: str, voice: str = "en", speed: int = 170) -> bytes:
    """WAV bytes of ``text`` spoken by espeak-ng."""
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise MMGenError("espeak-ng not found: install it (apt-get install espeak-ng)")
    try:
        out = subprocess.run(
            [exe, "-v", voice, "-s", str(speed), "--stdout", text], capture_output=True, check=True, timeout=60
        )
    except subprocess.CalledProcessError as e:
        raise MMGenError(f"espeak-ng failed on {text[:40]!r}: {e.stderr.decode(errors='replace').strip()}") from None
    return out.stdout
