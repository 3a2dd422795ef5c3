"""The walking skeleton end to end, at a toy scale: every stage runs and the report is honest."""

import json
import random

import pytest

from mmgen.quickstart import QuickstartConfig, quickstart
from mmgen.world import random_scene, render


def test_quickstart_end_to_end_small(tmp_path):
    cfg = QuickstartConfig(
        out=str(tmp_path / "qs"),
        docs=160,
        seed=3,
        defect_rate=0.1,
        workers=1,
        launcher="none",
        clip_overrides=["steps=4", "train_pairs=64", "eval_scenes=8", "batch_size=8", "progress=false"],
        tokenizer_overrides=["steps=8", "eval_images=16", "log_every=4", "ckpt_every=8", "progress=false"],
        train_overrides=["steps=3", "log_every=1", "save_every=3", "progress=false", "tensorboard=false"],
        sft_overrides=["steps=2", "log_every=1", "save_every=2", "progress=false", "tensorboard=false"],
        detokenizer_overrides=[
            "steps=2",
            "train_images=8",
            "eval_images=2",
            "batch_size=4",
            "log_every=1",
            "ckpt_every=2",
        ],
        eval_prompts=3,
        text_tokenizer_recipe="tiny_dualvitok_text",  # the demo leaves DualViTok's second stage out; run it here
    )
    report_md = quickstart(cfg)
    report = json.loads((report_md.parent / "report.json").read_text())
    # The world follows the quick start's caption-leaning mix (caption documents the commonest kind).
    world = json.loads((tmp_path / "qs" / ".done" / "world.json").read_text())["result"]
    assert sum(world["kinds"].values()) == 160 and max(world["kinds"], key=world["kinds"].get) == "caption"
    # Counts of the filter stage add up.
    filt = json.loads((tmp_path / "qs" / ".done" / "filter.json").read_text())["result"]
    assert filt["input"] == filt["kept"] + filt["rejected"] + filt["quarantined"]
    # Evaluation ran on both splits: each number is what the judged samples of its split add up to.
    ev = report_md.parent / "eval"

    def records(suite):
        return [
            r
            for line in (ev / "samples" / f"{suite}.jsonl").read_text().splitlines()
            for r in json.loads(line)["records"]
        ]

    def share(rows, key):
        return pytest.approx(sum(bool(r[key]) for r in rows) / len(rows))

    for split in ("val", "heldout"):
        m, rows = report["t2i"][split], [r for r in records("t2i") if r["split"] == split]
        assert m["n"] == len(rows) == 3
        assert m["accuracy"] == share(rows, "all_objects") and m["parse_rate"] == share(rows, "parsed")
    assert report["t2i_accuracy"] == report["t2i"]["val"]["accuracy"]
    # The tokenizer is DualViTok on a CLIP teacher the run trained itself (3x3 semantic + 9x9 pixel codes),
    # and the LM reads one code-block token per 3x3 pixel codes, fitted on the train split's codes.
    assert report["tokenizer"]["type"] == "CodeBlockTokenizer" and report["tokenizer"]["tokens_per_image"] == 18
    assert report["tokenizer"]["clip_teacher"]["steps"] == 4
    from mmgen.processing.vocab import Vocab
    from mmgen.tokenizers import load_image_tokenizer

    blocks = load_image_tokenizer(tmp_path / "qs" / "blocks" / "tokenizer")
    assert type(blocks.inner).__name__ == "DualViTok" and blocks.fit_stats["splits"] == ["train"]
    # DualViTok's second stage (text-aligned semantic codes) is the tokenizer the LM's blocks wrap; it
    # started from the first stage, whose pixel codes it kept exactly.
    stage2 = report["tokenizer"]["training"]
    assert stage2["init_from"] == str(tmp_path / "qs" / "tokenizer" / "tokenizer") and "eval_region_text_acc" in stage2
    first = load_image_tokenizer(tmp_path / "qs" / "tokenizer" / "tokenizer")
    pruned = stage2["pruned_codes"]["sem"]  # the entries training images use (almost) never are dropped
    assert blocks.inner.codebook_sizes["sem"] == pruned["codebook_size"] <= pruned["codebook_size_before"] == 128
    assert first.codebook_sizes["sem"] == 128
    rng = random.Random(5)
    imgs = [render(random_scene(rng, "val"), 36, 36) for _ in range(4)]
    assert (blocks.inner.encode(imgs)["pix"] == first.encode(imgs)["pix"]).all()
    assert blocks.fit_stats["coverage"] > 0 and blocks.fit_stats["table_size"] == blocks.fitted_rows
    # the blocks carry labels, and the blocks of probe objects the fitted table lacked come after it
    assert blocks.codebook_size == blocks.fitted_rows + blocks.fit_stats["composed"]
    assert sum(lab is not None for lab in blocks.labels) == blocks.fit_stats["labelled"] + blocks.fit_stats["composed"]
    # ... and the LM's vocab holds the block range the tiny recipe asks for, at the table's size.
    lm_vocab = Vocab.load(tmp_path / "qs" / "lm" / "vocab.json")
    assert lm_vocab.config.codebooks == {"pix": blocks.codebook_size}
    # both LM stages kept the labelled rows as attribute sums, up to the bundle the chat loads
    for stage in ("lm", "sft"):
        factored = json.loads((tmp_path / "qs" / stage / "summary.json").read_text())["block_factors"]
        assert factored["rows"] == blocks.fit_stats["labelled"] + blocks.fit_stats["composed"]
    from mmgen.models.bundle import load_bundle

    model = load_bundle(tmp_path / "qs" / "sft" / "final").model
    assert model.block_factors is not None and len(model.block_factors.ids) == factored["rows"]
    rec = report["tokenizer_reconstruction"]
    assert set(rec["scene_agreement_by_split"]) == {"val", "heldout"}
    assert report["inner_tokenizer_reconstruction"]["n"] == rec["n"]  # DualViTok alone, the same scenes
    # QA and build-up evaluation scored every sample, on the SFT checkpoint.
    assert report["checkpoint"].endswith("final") and "sft" in report["checkpoint"]
    # the final bundle carries the sampling settings its evaluation used (transformers' GenerationConfig)
    from mmgen.inference.settings import load_generation_config

    gen = json.loads((tmp_path / "qs" / "sft" / "final" / "generation_config.json").read_text())
    assert (gen["do_sample"], gen["temperature"], gen["guidance_scale"]) == (True, cfg.temperature, cfg.cfg_scale)
    assert load_generation_config(report["checkpoint"]).temperature == cfg.temperature
    qa, inter = records("qa"), records("interleaved")
    assert report["qa_accuracy"] == report["qa"]["val"]["accuracy"]
    assert report["qa_accuracy_heldout_compositions"] == share([r for r in qa if r["split"] == "heldout"], "correct")
    assert report["interleaved_accuracy"] == share([r for r in inter if r["split"] == "val"], "exact")
    # The evaluation stage is `mmgen eval run` with the quick start's settings: its report, grids and samples.
    assert report["eval_report"] == str(ev / "report.json") and report["sampling"]["temperature"] == cfg.temperature
    assert len(qa) == 6 and report["qa"]["val"]["accuracy"] == sum(s["correct"] for s in qa[:3]) / 3
    assert report["qa"]["val"]["intervals"]["accuracy"]["n"] == 3
    assert report["interleaved"]["val"]["n"] == 3 and (ev / "interleaved_grid.png").is_file()
    assert "## Image understanding" in report_md.read_text() and "eval/report.md" in report_md.read_text()
    assert (ev / "t2i_grid.png").stat().st_size > 0
    assert len(records("t2i")) == 6
    # the robust suite: the val prompts in every surface form, in the report with an example each
    from mmgen.world.surface import SURFACE_FORMS

    assert len(records("robust")) == 3 * len(SURFACE_FORMS)
    assert report["robust"]["as_written"]["accuracy"] == report["t2i"]["val"]["accuracy"]
    md = report_md.read_text()
    assert "## Text-to-image per surface form of the prompt" in md and "| lower_no_period | 3 |" in md
    # The 1x detokenizer is packed into the final bundle, for its block tokenizer's pixel codes (all the LM
    # writes), and the evaluation drew its pictures through it.
    from mmgen.models.detokenizer_set import pipeline_facts

    facts = pipeline_facts(tmp_path / "qs" / "sft" / "final" / "detokenizer" / "x1")
    assert facts["scale"] == 1 and facts["grid_names"] == ["pix"] and facts["tokenizer_type"] == "code_blocks"
    tok = load_image_tokenizer(tmp_path / "qs" / "sft" / "final" / "image_tokenizer")
    assert facts["tokenizer_sha256"] == tok.fingerprint()
    assert report["detokenizer"]["steps"] == 2 and "detokenizer" in report["stage_seconds"]
    assert report["image_decoding"].startswith(
        "one image block under the grid constraint, drawn by the diffusion detokenizer 1x"
    )
    assert "Generated pictures: one image block" in report_md.read_text()
    # A rerun skips every finished stage and reproduces the same metrics.
    again = json.loads((quickstart(cfg).parent / "report.json").read_text())
    assert again["t2i"] == report["t2i"]
