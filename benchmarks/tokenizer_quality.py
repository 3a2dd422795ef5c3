"""DualViTok quality on the tiny preset: full vs pixel branch alone vs semantic branch alone.

    python benchmarks/tokenizer_quality.py                                   # trains CLIP + DualViTok if missing
    python benchmarks/tokenizer_quality.py --tokenizer runs/tokenizer/tiny_dualvitok/tokenizer --scenes 300

Measures, and writes the BENCHMARKS.md section "tokenizer_quality":
* scene-parser agreement (exact scene) between held-out ShapesWorld renders and their reconstructions;
* PSNR on the real photos in ../shared/data/real/ resized to the tokenizer's resolution;
  both for three decodings of the same codes: sem + pix (full), pix only and sem only (the missing level
  replaced by its learned null vector, as trained with branch dropout), with tokens per image;
* codebook usage of both quantizers on the held-out set;
* linear probes (logistic regression on the codes' codebook vectors) predicting colour and shape of
  the largest object, trained on train-split scenes, tested on unseen val scenes and on held-out
  colour-shape pairs: semantic vs pixel codes.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT.parent / "shared" / "data" / "real"


def training_seconds(run_dir: Path) -> tuple[float, int]:
    """Wall seconds summed over every (resumed) run in metrics.jsonl, and the number of runs:
    ``elapsed_s`` restarts from zero in each run."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return float("nan"), 0
    elapsed = [json.loads(x)["elapsed_s"] for x in path.read_text().splitlines() if x.strip()]
    ends = [a for a, b in zip(elapsed, elapsed[1:] + [-1.0]) if b < a]
    return float(sum(ends)), len(ends)


def run_base(run_dir: Path, cfg: dict) -> Path:
    """The directory a run was started in: the relative paths in its config.yaml are relative to it
    (``out_dir`` is the run directory's own path from there)."""
    out = Path(cfg.get("out_dir") or "").as_posix()
    here = run_dir.resolve().as_posix()
    if out and not out.startswith("/") and here.endswith("/" + out):
        return Path(here[: -len(out) - 1])
    return ROOT


def training_lineage(run_dir: Path) -> tuple[list[dict], dict]:
    """The training stages behind a tokenizer run, first to last, followed through ``init_from``
    (each: its ``out_dir``, steps, batch, wall seconds, resumed runs), and the final stage's teacher's
    ``eval.json`` when the teacher is a CLIP run of mmgen's ({} otherwise)."""
    from mmgen.utils.files import read_json

    stages, teacher = [], None
    while run_dir is not None and (run_dir / "config.yaml").is_file():
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        base = run_base(run_dir, cfg)
        seconds, runs = training_seconds(run_dir)
        stages.insert(
            0,
            {
                "name": cfg.get("out_dir") or str(run_dir),
                "steps": cfg.get("steps"),
                "batch": cfg.get("batch_size"),
                "seconds": seconds,
                "runs": runs,
            },
        )
        name = ((cfg.get("dualvitok") or {}).get("teacher") or {}).get("name")
        if teacher is None and name:
            teacher = read_json((base / name).parent / "eval.json", {})
        run_dir = (base / cfg["init_from"]).parent if cfg.get("init_from") else None
    return stages, teacher or {}


def lineage_line(stages: list[dict], clip: dict) -> str:
    parts = [
        f"stage {i} `{st['name']}` {st['steps']} steps of batch {st['batch']} in {st['seconds']:.0f} s"
        + (f" ({st['runs']} runs, resumed)" if st["runs"] > 1 else "")
        for i, st in enumerate(stages, 1)
    ]
    teacher = (
        f"its CLIP teacher {clip.get('steps', '?')} steps in {clip.get('train_seconds', '?')} s (held-out "
        f"zero-shot colour {clip.get('zero_shot_color_acc', '?')}, shape {clip.get('zero_shot_shape_acc', '?')})"
        if clip
        else "its teacher not a CLIP run of mmgen's (no eval.json beside it)"
    )
    return (
        f"Training: DualViTok {'; '.join(parts) or 'no config.yaml beside the tokenizer'}; {teacher}; "
        "2 shared CPU cores, other jobs running, so seconds are noisy."
    )


DEFAULT_TOKENIZER = ROOT / "runs" / "tokenizer" / "tiny_dualvitok" / "tokenizer"


def ensure_tokenizer(path: Path) -> Path:
    """The tokenizer at ``path``; only the default path is trained when missing (a mistyped
    ``--tokenizer`` is an error, not a six-minute training run)."""
    if (path / "config.json").is_file():
        return path
    if path.resolve() != DEFAULT_TOKENIZER.resolve():
        raise SystemExit(
            f"no tokenizer at {path} (a directory with config.json); omit --tokenizer to train the default"
        )
    clip = ROOT / "runs" / "clip" / "tiny" / "clip"
    if not (clip / "open_clip_config.json").is_file():
        subprocess.run(
            [sys.executable, "-m", "mmgen", "train-clip", "tiny_clip", "progress=false"], check=True, cwd=ROOT
        )
    subprocess.run(
        [sys.executable, "-m", "mmgen", "train-tokenizer", "tiny_dualvitok", "progress=false"], check=True, cwd=ROOT
    )
    return DEFAULT_TOKENIZER


def render_set(n: int, split: str, seed: int, size: int):
    """``n`` scenes of ``split``, rendered as the quick start's world renders them for a tokenizer of side
    ``size`` (render_side: a whole multiple of it, which the tokenizer's resize then brings down)."""
    from mmgen.world import random_scene, render, render_side

    rng = random.Random(f"tokq-{split}-{seed}")
    scenes = [random_scene(rng, split) for _ in range(n)]
    side = render_side(size)
    return scenes, [render(s, side, side) for s in scenes]


def encode_all(tok, images, batch: int = 64) -> dict:
    out = {"sem": [], "pix": []}
    for i in range(0, len(images), batch):
        c = tok.encode(images[i : i + batch])
        for k in out:
            out[k].append(c[k])
    return {k: torch.cat(v) for k, v in out.items()}


VARIANTS = {"full (sem + pix)": ("sem", "pix"), "pixel branch alone": ("pix",), "semantic branch alone": ("sem",)}


def decode_variant(tok, codes: dict, keep: tuple, batch: int = 64) -> list:
    n = len(codes["pix"])
    out = []
    for i in range(0, n, batch):
        out += tok.decode({k: codes[k][i : i + batch] for k in keep})
    return out


def psnr(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(10 * np.log10(255.0**2 / max(np.mean((a - b) ** 2), 1e-10)))


def scene_agreement(recons, scenes) -> float:
    from mmgen.world.scene_parser import compare_scenes, parse_scene

    return float(np.mean([compare_scenes(parse_scene(r), s)["exact"] for r, s in zip(recons, scenes)]))


def code_entropy(images, codes: torch.Tensor, patch: int) -> tuple[float, float]:
    """Entropy of the pixel codes, and their entropy given the exact ``patch x patch`` pixels they stand
    for (nats). The second is 0 when identical pixels always get the same code; what is left is
    context the LM has to predict from a caption."""
    import math
    from collections import defaultdict

    arr = np.stack([np.asarray(im) for im in images])
    by_patch: dict = defaultdict(Counter)
    n, gh, gw = codes.shape
    for i in range(n):
        for r in range(gh):
            for c in range(gw):
                by_patch[arr[i, patch * r : patch * (r + 1), patch * c : patch * (c + 1)].tobytes()][
                    int(codes[i, r, c])
                ] += 1

    def h(cnt: Counter) -> float:
        t = sum(cnt.values())
        return -sum(v / t * math.log(v / t) for v in cnt.values())

    total = n * gh * gw
    return h(Counter(codes.flatten().tolist())), sum(sum(c.values()) / total * h(c) for c in by_patch.values())


def real_photos(size) -> list:
    from PIL import Image

    paths = sorted(p for p in REAL.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    return [Image.open(p).convert("RGB").resize(size, Image.BICUBIC) for p in paths], [p.name for p in paths]


def unique_largest_set(n: int, split: str, seed: int, size: int):
    """Scenes whose largest object is unambiguous (one object, or exactly one large one)."""
    from mmgen.world import random_scene, render, render_side

    rng = random.Random(f"probe-{split}-{seed}")
    scenes = []
    while len(scenes) < n:
        s = random_scene(rng, split)
        if len(s.objects) == 1 or sum(o.size == "large" for o in s.objects) == 1:
            scenes.append(s)
    side = render_side(size)
    return scenes, [render(s, side, side) for s in scenes]


def code_features(tok, codes: torch.Tensor, level: str) -> torch.Tensor:
    """The codes' codebook vectors, flattened over positions: what a linear probe on codes sees."""
    with torch.no_grad():
        v = getattr(tok, f"{level}_quantizer").embed(codes)
    return v.flatten(1)


def teacher_features(tok, images, batch: int = 64) -> torch.Tensor:
    """The frozen teacher's patch features, flattened over positions: what semantic codes trained only
    to reconstruct them can carry at most."""
    from mmgen.utils.pixels import pil_to_tensor

    with torch.no_grad():
        return torch.cat(
            [
                tok.teacher(pil_to_tensor(images[i : i + batch], tok.resolution)).flatten(1)
                for i in range(0, len(images), batch)
            ]
        )


def standardise(feats: dict[str, torch.Tensor], fit_on: str = "train") -> dict[str, torch.Tensor]:
    """Every split scaled to zero mean, unit variance per feature with the statistics of ``fit_on``
    alone, as a probe fitted before seeing the test scenes would be."""
    mean, std = feats[fit_on].mean(0), feats[fit_on].std(0) + 1e-6
    return {name: (v - mean) / std for name, v in feats.items()}


# From no penalty at all up: a grid that began at 1e-4 picked 1e-4, so the best strength could lie
# below it.
PROBE_L2 = (0.0, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def fit_probe(x, y, classes: int, l2: float, steps: int = 300) -> torch.nn.Linear:
    """Multinomial logistic regression (full-batch L-BFGS) with an L2 penalty on the weights."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(lin.parameters(), lr=0.5, max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(x), y) + l2 * lin.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


def accuracy(lin, x, y) -> float:
    with torch.no_grad():
        return float((lin(x).argmax(-1) == y).float().mean())


def linear_probe(x_tr, y_tr, x_te, y_te, classes: int, l2: float | None = None) -> tuple[float, float]:
    """Test accuracy of a linear probe and its L2 strength. ``l2=None`` picks it the way CLIP's
    linear-probe protocol does: fitted on the first 80% of the training scenes for each strength in
    PROBE_L2, scored on the last 20%, the best refitted on all of them (on a tie, the strongest). The
    test sets play no part."""
    if l2 is None:
        cut = int(0.8 * len(x_tr))
        scores = [accuracy(fit_probe(x_tr[:cut], y_tr[:cut], classes, lam), x_tr[cut:], y_tr[cut:]) for lam in PROBE_L2]
        l2 = PROBE_L2[max(range(len(PROBE_L2)), key=lambda i: (scores[i], i))]
    return accuracy(fit_probe(x_tr, y_tr, classes, l2), x_te, y_te), l2


def phrase_purity(train: tuple, test: tuple) -> tuple[float, list] | None:
    """How well one semantic code names one cell phrase: each code is read as the phrase most of the
    training cells it encodes show; returns the share of test cells whose code reads as their own
    phrase, and the most frequent (true, read) confusions. ``train`` / ``test`` are (scenes, sem codes);
    None when the code grid is not the phrase grid."""
    from mmgen.world import cell_phrases

    def cells(scenes, codes):
        flat = codes.flatten(1).tolist()
        if len(flat[0]) != len(cell_phrases(scenes[0])):
            return None
        return [(p, c) for s, row in zip(scenes, flat) for p, c in zip(cell_phrases(s), row)]

    tr, te = cells(*train), cells(*test)
    if tr is None:
        return None
    seen: dict[int, Counter] = {}
    for phrase, code in tr:
        seen.setdefault(code, Counter())[phrase] += 1
    read = {code: cnt.most_common(1)[0][0] for code, cnt in seen.items()}
    wrong = Counter((p, read.get(c, "an unseen code")) for p, c in te if read.get(c) != p)
    return 1 - sum(wrong.values()) / len(te), wrong.most_common(3)


def purity_line(purity: tuple[float, list], n_train: int, n_test: int) -> str:
    share, misread = purity
    worst = "; ".join(f"{a} → {b}, {k}" for (a, b), k in misread)
    return (
        f"One code, one phrase: with each semantic code read as the cell phrase it most often encodes in the "
        f"{n_train} probe-training scenes, {100 * share:.2f}% of the cells of the {n_test} `val` scenes read as "
        f"their own phrase{f'; most frequent misreadings (true → read, cells): {worst}' if worst else ''}. A pair "
        "of phrases sharing one code is what costs the probe most (the largest object's colour or shape is lost "
        "whenever it is one of them)."
    )


def probes(tok, n_train: list[int], n_test: int, size: int, l2: float | None = None) -> tuple[dict, dict, tuple | None]:
    """Probe accuracy per (attribute, code level, test split, training scenes): val = unseen scenes,
    heldout = scenes with colour-shape pairs never seen by the tokenizer, the teacher or the probe; and
    the L2 strength used per (attribute, code level, training scenes) (``l2=None``: chosen on the
    training scenes, see linear_probe). Each training set is the first ``n`` of the largest one. Also
    :func:`phrase_purity` of the semantic codes on the val scenes."""
    from mmgen.models.clip_train import largest_object
    from mmgen.world import COLORS, SHAPES

    sets = {
        name: unique_largest_set(n, split, seed, size)
        for name, n, split, seed in (
            ("train", max(n_train), "train", 1),
            ("val", n_test, "val", 2),
            ("heldout", n_test, "heldout", 3),
        )
    }
    codes = {name: encode_all(tok, imgs) for name, (_, imgs) in sets.items()}
    res, chosen = {}, {}
    for level in ("sem", "pix", "teacher"):
        feats = (
            teacher_features(tok, [im for k in sets for im in sets[k][1]])
            if level == "teacher"
            else code_features(tok, torch.cat([codes[k][level] for k in sets]), level)
        )
        f = standardise(dict(zip(sets, torch.split(feats, [len(sets[k][0]) for k in sets]))))
        for attr, values in (("color", list(COLORS)), ("shape", list(SHAPES))):
            y = {
                name: torch.tensor([values.index(getattr(largest_object(s), attr)) for s in scenes])
                for name, (scenes, _) in sets.items()
            }
            for n in n_train[:1] if level == "teacher" else n_train:  # 5184 features: slow, and only a reference
                lam = l2
                for split in ("val", "heldout"):  # the first split's choice serves the second: one probe per level
                    res[(attr, level, split, n)], lam = linear_probe(
                        f["train"][:n], y["train"][:n], f[split], y[split], len(values), lam
                    )
                chosen[(attr, level, n)] = lam
    purity = phrase_purity((sets["train"][0], codes["train"]["sem"]), (sets["val"][0], codes["val"]["sem"]))
    return res, chosen, purity


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    ap.add_argument("--scenes", type=int, default=300, help="held-out scenes for agreement and codebook usage")
    ap.add_argument(
        "--probe-train", default="2000,6000", help="training scenes of the probes, comma-separated: one probe per count"
    )
    ap.add_argument("--probe-test", type=int, default=500)
    ap.add_argument(
        "--probe-l2",
        type=float,
        default=None,
        help="fixed L2 strength of the probes (1e-4 reproduces the earliest probe numbers); "
        "default: chosen on the training scenes",
    )
    ap.add_argument("--no-write", action="store_true", help="print only, leave BENCHMARKS.md alone")
    args = ap.parse_args()
    torch.set_num_threads(1)

    from mmgen.tokenizers import load_image_tokenizer
    from mmgen.tokenizers.quantizers import usage_fraction
    from mmgen.utils.bench import md_table, write_section
    from mmgen.utils.files import read_json

    tok_dir = ensure_tokenizer(Path(args.tokenizer))
    tok = load_image_tokenizer(tok_dir)
    w, h = tok.resolution
    t0 = time.time()
    # held-out scenes: half val (unseen scenes), half heldout (unseen colour-shape pairs)
    s_val, i_val = render_set(args.scenes // 2, "val", 0, w)
    s_ho, i_ho = render_set(args.scenes - args.scenes // 2, "heldout", 0, w)
    scenes, images = s_val + s_ho, i_val + i_ho
    codes = encode_all(tok, images)
    photos, names = real_photos((w, h))
    pcodes = encode_all(tok, photos)
    shapes = tok.code_shapes(w, h)
    n_patches = (h // tok.teacher.patch) * (w // tok.teacher.patch)
    tokens = {"sem": shapes["sem"][0] * shapes["sem"][1], "pix": shapes["pix"][0] * shapes["pix"][1]}

    rows, results = [], {}
    for label, keep in VARIANTS.items():
        agree = scene_agreement(decode_variant(tok, codes, keep), scenes)
        rec = decode_variant(tok, pcodes, keep)
        p = float(np.mean([psnr(a, b) for a, b in zip(photos, rec)]))
        ntok = sum(tokens[k] for k in keep)
        rows.append([label, ntok, f"{100 * agree:.1f}%", f"{p:.2f}"])
        results[label] = {"tokens_per_image": ntok, "scene_agreement": agree, "real_psnr_db": p}
    usage = {lvl: usage_fraction(getattr(tok, f"{lvl}_quantizer"), codes[lvl]) for lvl in ("sem", "pix")}
    n_train = [int(n) for n in str(args.probe_train).split(",")]
    probe, probe_l2, purity = probes(tok, n_train, args.probe_test, w, args.probe_l2)
    h_code, h_given_patch = code_entropy(images, codes["pix"], tok.downsample)
    seconds = time.time() - t0

    train = read_json(tok_dir.parent / "eval.json", {})
    stages, clip = training_lineage(tok_dir.parent)
    body = [
        f"Tokenizer `{Path(tok_dir).relative_to(ROOT) if Path(tok_dir).is_relative_to(ROOT) else tok_dir}` "
        f"({tok.resolution[0]}x{tok.resolution[1]}, sem {shapes['sem'][0]}x{shapes['sem'][1]} codes from "
        f"{tok.codebook_sizes['sem']} entries, pix {shapes['pix'][0]}x{shapes['pix'][1]} from "
        f"{tok.codebook_sizes['pix']}; {train.get('parameters', tok.num_parameters()):,} parameters incl. the frozen "
        "teacher).",
        lineage_line(stages, clip),
        "",
        f"Reconstruction: {len(scenes)} held-out ShapesWorld scenes (half `val`, half `heldout` pairs), scene-parser "
        f"exact agreement of input vs reconstruction; PSNR over the {len(photos)} real photos ({', '.join(names)}) "
        f"resized to {w}x{h}. The three rows decode the same codes; a missing level is its learned null vector.",
        "",
        md_table(["decoding", "tokens / image", "scene agreement", "real-photo PSNR (dB)"], rows),
        "",
        f"Codebook usage on the {len(scenes)} held-out scenes: semantic {100 * usage['sem'][0]:.1f}% of "
        f"{tok.codebook_sizes['sem']}, pixel {100 * usage['pix'][0]:.1f}% of {tok.codebook_sizes['pix']}.",
        f"Pixel-code entropy {h_code:.2f} nats, {h_given_patch:.2f} nats given the exact "
        f"{tok.downsample}x{tok.downsample} pixels of the code's patch (0: the same pixels always get the same code; "
        "more is scene context the LM must predict).",
        "",
        f"Linear probe (logistic regression on the codes' codebook vectors, all positions, each feature standardised "
        f"with the probe's training scenes' mean and spread) predicting colour / "
        f"shape of the largest object, trained on {' or '.join(map(str, n_train))} train-split scenes, tested on "
        f"{args.probe_test} unseen `val` scenes and on {args.probe_test} `heldout` scenes (colour-shape pairs never "
        "seen in any training); scenes with an unambiguous largest object. "
        + (
            f"L2 strength {args.probe_l2:g} for every probe. "
            if args.probe_l2 is not None
            else f"L2 strength chosen per probe from {', '.join(map(str, PROBE_L2))} on the last fifth of its training "
            f"scenes (CLIP's linear-probe protocol); chosen: "
            f"{', '.join(sorted({f'{v:g}' for v in probe_l2.values()}))}. "
        )
        + "The teacher rows probe the frozen teacher's own patch features, the semantic branch's input: all its "
        "codes carry unless the tokenizer was trained with region-text alignment (`text_weight`), which adds what "
        "the cell phrases name. Each probe reads one set of positions with its own weights, so it needs scenes "
        "enough to see each object at each position.",
        "",
        md_table(
            [
                "codes",
                "tokens",
                "probe training scenes",
                "colour (val)",
                "shape (val)",
                "colour (heldout)",
                "shape (heldout)",
            ],
            [
                [name, ntok, n]
                + [f"{100 * probe[(a, lvl, sp, n)]:.1f}%" for sp in ("val", "heldout") for a in ("color", "shape")]
                for name, lvl, ntok in (
                    ("semantic", "sem", tokens["sem"]),
                    ("pixel", "pix", tokens["pix"]),
                    ("teacher patch features", "teacher", f"{n_patches} x {tok.teacher.dim}"),
                )
                for n in n_train
                if ("color", lvl, "val", n) in probe
            ],
        ),
        "",
        *([] if purity is None else [purity_line(purity, max(n_train), args.probe_test), ""]),
        f"Measurement took {seconds:.0f} s.",
    ]
    text = "\n".join(body)
    print(text)
    print(
        json.dumps(
            {
                "variants": results,
                "usage": usage,
                "pix_code_entropy": h_code,
                "pix_code_entropy_given_patch": h_given_patch,
                "probe": {"/".join(map(str, k)): v for k, v in probe.items()},
                "probe_l2": {"/".join(map(str, k)): v for k, v in probe_l2.items()},
                "phrase_purity": None if purity is None else purity[0],
            }
        )
    )
    if not args.no_write:
        write_section("tokenizer_quality", "Image tokenizer quality (DualViTok, tiny)", text)


if __name__ == "__main__":
    main()
