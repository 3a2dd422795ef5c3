"""``mmgen eval run`` / ``compare``: reports with counts and intervals, provenance, resume, exact reruns,
the same numbers as the evaluation functions the quick start used, and one-line errors."""

from __future__ import annotations

import json

import pytest

from mmgen.errors import MMGenError
from mmgen.eval.stats import difference, proportion, wilson


def test_wilson_and_newcombe_on_known_counts():
    assert wilson(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4) and wilson(0, 10)[0] == 0.0
    assert wilson(10, 10)[1] == 1.0 and wilson(0, 0) == (0.0, 1.0)
    assert proportion(81, 263)["ci95"] == pytest.approx([0.2553, 0.3662], abs=1e-4)
    # Newcombe (1998), method 10: 56/70 vs 48/80 -> difference 0.2, interval (0.0524, 0.3339)
    d = difference(proportion(48, 80), proportion(56, 70))
    assert (
        d["value"] == pytest.approx(0.2) and d["ci95"] == pytest.approx([0.0524, 0.3339], abs=1e-4) and d["significant"]
    )
    assert not difference(proportion(5, 10), proportion(6, 10))["significant"]


def _records(out, suite):
    return [
        r for line in (out / "samples" / f"{suite}.jsonl").read_text().splitlines() for r in json.loads(line)["records"]
    ]


def test_run_writes_a_reproducible_report(bundle_dir, tmp_path):
    from mmgen.eval.run import run_eval

    gc = {"do_sample": True, "temperature": 0.7, "top_k": 5, "guidance_scale": 1.5}
    (bundle_dir / "generation_config.json").write_text(json.dumps(gc))
    try:
        rep = run_eval(
            bundle_dir,
            "t2i,geneval,qa,interleaved,recon",
            tmp_path / "a",
            n=3,
            batch_size=2,
            geneval_per_tag=1,
            recon_n=4,
            continuation_n=2,
            top_p=0.9,
            progress=False,
        )
    finally:
        (bundle_dir / "generation_config.json").unlink()
    s = rep["sampling"]
    assert (s["temperature"], s["top_k"], s["top_p"], s["cfg_scale"], s["seed"]) == (0.7, 5, 0.9, 1.5, 0)
    assert s["sources"] == {
        "temperature": "generation_config.json",
        "top_k": "generation_config.json",
        "top_p": "explicit",
        "cfg_scale": "generation_config.json",
        "seed": "quickstart",
    }
    assert len(rep["checkpoint"]["sha256"]) == 64 and "model.safetensors" in rep["checkpoint"]["hashed_files"]
    assert "tokenizer.json" in rep["checkpoint"]["hashed_files"]
    assert rep["evaluator"]["version"] and set(rep["suites"]) == {"t2i", "geneval", "qa", "interleaved", "recon"}
    t2i = rep["suites"]["t2i"]
    assert t2i["samples"] == 6 and len(t2i["prompt_set"]["sha256"]) == 64
    acc = t2i["metrics"]["val"]["intervals"]["all_objects"]
    assert acc["n"] == 3 and acc["k"] == round(3 * t2i["metrics"]["val"]["accuracy"]) and len(acc["ci95"]) == 2
    ge = rep["suites"]["geneval"]["metrics"]
    assert ge["images"]["n"] == 6 and set(ge["tags"]) == {
        "single_object",
        "two_object",
        "counting",
        "colors",
        "position",
        "color_attr",
    }
    lines = (tmp_path / "a" / "geneval_results.jsonl").read_text().splitlines()
    assert len(lines) == 6 and {"correct", "reason", "tag", "prompt", "metadata", "details"} <= set(
        json.loads(lines[0])
    )
    inter = rep["suites"]["interleaved"]["metrics"]["val"]
    assert set(inter["aspects"]) == {"perceptual_quality", "image_coherence", "text_image_coherence", "helpfulness"}
    # continuation: the model writes the next instruction itself, so text quality is judged too
    cont = rep["suites"]["interleaved"]["metrics"]["continuation_val"]
    assert cont["n"] == 2 and cont["aspects"]["text_quality"]["n"] == 2
    assert rep["suites"]["recon"]["metrics"]["tokenizer"]["intervals"]["scene_agreement"]["n"] == 4
    md = (tmp_path / "a" / "report.md").read_text()
    assert "95% CI" in md and "seed 0" in md and "t2i_grid.png" in md
    for name in ("t2i", "geneval", "qa", "interleaved", "recon"):
        assert (tmp_path / "a" / f"{name}_grid.png").is_file()


def test_same_seed_same_result_and_resume_after_a_kill(bundle_dir, tmp_path):
    from mmgen.eval.run import run_eval

    kw = dict(n=4, batch_size=2, temperature=1.0, progress=False)
    full = run_eval(bundle_dir, "t2i", tmp_path / "full", **kw)
    # a run killed after its first batch, mid-way through writing the second line
    part = tmp_path / "part"
    run_eval(bundle_dir, "t2i", part, **kw)
    store = part / "samples" / "t2i.jsonl"
    first, second = store.read_text().splitlines()[:2]
    store.write_text(first + "\n" + second[:40])
    again = run_eval(bundle_dir, "t2i", part, **kw)
    assert again["suites"]["t2i"]["resumed_batches"] == 1
    strip = lambda rs: [{k: v for k, v in r.items() if k != "image"} for r in rs]  # noqa: E731
    assert strip(_records(part, "t2i")[-8:]) == strip(_records(tmp_path / "full", "t2i"))
    assert again["suites"]["t2i"]["metrics"] == full["suites"]["t2i"]["metrics"]
    # another seed is another run: the folder refuses to mix them
    with pytest.raises(MMGenError, match="holds results of another run .*sampling"):
        run_eval(bundle_dir, "t2i", part, **{**kw, "seed": 1})


def test_suites_give_the_numbers_of_the_evaluation_functions(bundle_dir, tmp_path):
    """What the quick start reported before it called mmgen eval: same prompts, seeds and batches, same numbers."""
    from mmgen.eval.run import run_eval
    from mmgen.eval.t2i import evaluate_t2i
    from mmgen.eval.understanding import evaluate_interleaved, evaluate_qa
    from mmgen.models.bundle import load_bundle

    bundle = load_bundle(bundle_dir)
    rep = run_eval(
        bundle_dir,
        "t2i,qa,interleaved",
        tmp_path / "e",
        n=5,
        batch_size=16,
        temperature=1.0,
        seed=3,
        progress=False,
        bundle=bundle,
    )
    m = {k: v["metrics"] for k, v in rep["suites"].items()}
    old = evaluate_t2i(bundle, n=5, seed=3, temperature=1.0)["splits"]
    for split in ("val", "heldout"):
        assert {k: v for k, v in m["t2i"][split].items() if k != "intervals"} == old[split]
    qa = evaluate_qa(bundle, n=5, seed=3)["splits"]
    assert {sp: {k: v for k, v in m["qa"][sp].items() if k != "intervals"} for sp in qa} == qa
    inter = evaluate_interleaved(bundle, n=5, seed=3, temperature=1.0)
    got = m["interleaved"]["val"]
    assert (got["accuracy"], got["parse_rate"], got["object_recall"]) == tuple(
        inter["splits"]["val"][k] for k in ("accuracy", "parse_rate", "object_recall")
    )


def test_robust_suite_judges_each_prompt_in_every_surface_form(bundle_dir, tmp_path):
    """Per form: the t2i prompts rewritten, judged and counted apart; as written, the t2i suite's own
    records (same prompts, same seeds: the forms differ in their text alone); in the report and its comparison."""
    from mmgen.eval.run import compare_reports, run_eval
    from mmgen.world import parse_caption
    from mmgen.world.surface import SURFACE_FORMS, surface_form

    kw = dict(n=3, batch_size=2, temperature=1.0, progress=False)
    rep = run_eval(bundle_dir, "t2i,robust", tmp_path / "a", **kw)
    recs = _records(tmp_path / "a", "robust")
    t2i = {r["id"]: r for r in _records(tmp_path / "a", "t2i")}
    assert len(recs) == 3 * len(SURFACE_FORMS)
    for r in recs:
        i = int(r["id"].split("/")[1])
        base = t2i[f"val/{i}"]
        assert r["prompt"] == surface_form(base["prompt"], r["form"], f"1234-{i}")
        assert parse_caption(r["prompt"]).key() == parse_caption(base["prompt"]).key()
        if r["form"] == "as_written":
            assert {k: v for k, v in r.items() if k not in ("id", "image", "form")} == {
                k: v for k, v in base.items() if k not in ("id", "image")
            }
        else:
            assert r["prompt"] != base["prompt"]
    m = rep["suites"]["robust"]["metrics"]
    assert set(SURFACE_FORMS) <= set(m)
    for form in SURFACE_FORMS:
        mine = [r for r in recs if r["form"] == form]
        assert m[form]["intervals"]["all_objects"]["k"] == sum(r["all_objects"] for r in mine)
        assert m[form]["n"] == m[form]["intervals"]["all_objects"]["n"] == 3
    assert m["as_written"]["accuracy"] == rep["suites"]["t2i"]["metrics"]["val"]["accuracy"]
    worst = m["lowest"]
    assert worst["value"] == min(m[f]["accuracy"] for f in SURFACE_FORMS) and worst["form"] in SURFACE_FORMS
    md = (tmp_path / "a" / "report.md").read_text()
    assert "| form | accuracy (all objects) |" in md and "| lower_no_period |" in md and "robust_grid.png" in md
    assert (tmp_path / "a" / "robust_grid.png").is_file()
    # fewer forms, another run; the comparison pairs the forms both hold
    run_eval(bundle_dir, "robust", tmp_path / "b", robust_forms="as_written,no_period", **kw)
    cmp = compare_reports(tmp_path / "a" / "report.json", tmp_path / "b" / "report.json")
    rows = {r["metric"] for r in cmp["rows"]}
    assert {
        "robust.as_written.intervals.all_objects",
        "robust.no_period.intervals.all_objects",
        "robust.lowest",
    } <= rows
    assert "robust.spacing.intervals.all_objects" in cmp["only_a"]
    # a resumed run reuses every batch
    again = run_eval(bundle_dir, "t2i,robust", tmp_path / "a", **kw)
    assert again["suites"]["robust"]["resumed_batches"] == 2 * len(SURFACE_FORMS)
    assert again["suites"]["robust"]["metrics"] == m


def test_compare_prints_differences_with_intervals(bundle_dir, tmp_path):
    from mmgen.eval.run import compare_reports, format_comparison, run_eval

    a = run_eval(bundle_dir, "qa", tmp_path / "a", n=3, progress=False)
    b = run_eval(bundle_dir, "qa", tmp_path / "b", n=3, seed=5, progress=False)
    cmp = compare_reports(tmp_path / "a" / "report.json", tmp_path / "b" / "report.json")
    rows = {r["metric"]: r for r in cmp["rows"]}
    assert "qa.val.intervals.accuracy" in rows and rows["qa.val.intervals.accuracy"]["a"]["n"] == 3
    assert cmp["settings"]["sampling"]["a"]["seed"] == 0 and cmp["settings"]["sampling"]["b"]["seed"] == 5
    assert "qa.prompt_set" in cmp["settings"]  # another seed draws other questions
    text = format_comparison(cmp)
    assert "qa.val.intervals.accuracy" in text and "B-A [95% CI]" in text and "setting sampling differs" in text
    assert a["suites"]["qa"]["prompt_set"]["sha256"] != b["suites"]["qa"]["prompt_set"]["sha256"]


def test_cli_errors_are_one_line(bundle_dir, tmp_path, capsys):
    from mmgen.cli import main
    from mmgen.models.bundle import Bundle, load_bundle

    assert main(["eval", "run", str(bundle_dir), "--suite", "t2i,speech", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown suite speech; use a comma list of t2i, robust, geneval, qa, interleaved, recon or all"
    assert (
        main(
            [
                "eval",
                "run",
                str(bundle_dir),
                "--suite",
                "robust",
                "--forms",
                "as_written,shouting",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: unknown surface form 'shouting'; use a comma list of as_written,") and "\n" not in err
    # a checkpoint without an image tokenizer, asked for t2i
    b = load_bundle(bundle_dir)
    Bundle(b.model, b.text_tokenizer, b.vocab, None, b.meta).save(tmp_path / "textonly")
    (tmp_path / "textonly" / "model.safetensors").write_bytes(b"cut")  # the check reads files only, before the weights
    capsys.readouterr()
    assert main(["eval", "run", str(tmp_path / "textonly"), "--suite", "t2i", "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: suite t2i needs a checkpoint with an image tokenizer") and "\n" not in err
    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"caption": "a red circle"}\n')
    assert (
        main(
            [
                "eval",
                "run",
                str(bundle_dir),
                "--suite",
                "geneval",
                "--geneval-prompts",
                str(bad),
                "--out",
                str(tmp_path / "z"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "prompts.jsonl:1: missing tag, prompt, include" in err and "\n" not in err
    assert main(["eval", "run", str(tmp_path / "nowhere"), "--suite", "qa", "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: checkpoint directory") and "does not exist" in err and "\n" not in err
    (tmp_path / "empty").mkdir()
    assert main(["eval", "run", str(tmp_path / "empty"), "--suite", "qa", "--out", str(tmp_path / "w")]) == 2
    assert "is not an mmgen checkpoint (no config.json or vocab.json)" in capsys.readouterr().err
    assert main(["eval", "compare", str(tmp_path / "nope.json"), str(tmp_path / "nope.json")]) == 2
    assert "report not found" in capsys.readouterr().err


def test_cli_run_and_compare(bundle_dir, tmp_path, capsys):
    from mmgen.cli import main

    out = tmp_path / "r"
    assert main(["eval", "run", str(bundle_dir), "--suite", "qa", "--n", "2", "--out", str(out)]) == 0
    assert (out / "report.json").is_file() and "wrote" in capsys.readouterr().out
    assert main(["eval", "compare", str(out / "report.json"), str(out / "report.json")]) == 0
    assert "+0.0" in capsys.readouterr().out


def test_sampling_sources_credit_the_file_only_with_the_keys_it_holds(tmp_path):
    import json

    from mmgen.eval.provenance import sampling_settings
    from mmgen.quickstart import QuickstartConfig

    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.7, "bos_token_id": 1}))
    s = sampling_settings(tmp_path, cfg_scale=2.0)
    assert s["temperature"] == 0.7 and s["sources"]["temperature"] == "generation_config.json"
    assert s["cfg_scale"] == 2.0 and s["sources"]["cfg_scale"] == "explicit"
    assert s["top_k"] == 0 and s["sources"]["top_k"] == "quickstart"
    assert s["seed"] == QuickstartConfig().eval_seed


def test_eval_samples_with_the_settings_generate_uses(bundle_dir):
    """One rule for both: a file that asks to sample without a temperature means transformers' 1."""
    from mmgen.eval.provenance import sampling_settings
    from mmgen.inference.settings import bundle_sampling
    from mmgen.models.bundle import load_bundle

    (bundle_dir / "generation_config.json").write_text(json.dumps({"do_sample": True, "top_k": 5}))
    try:
        s = sampling_settings(bundle_dir)
        g = bundle_sampling(load_bundle(bundle_dir))
        with pytest.raises(MMGenError, match="temperature must be >= 0"):
            sampling_settings(bundle_dir, temperature=-1.0)
    finally:
        (bundle_dir / "generation_config.json").unlink()
    assert (s["temperature"], s["top_k"], s["top_p"], s["cfg_scale"]) == (g.temperature, g.top_k, g.top_p, g.cfg_scale)
    assert s["temperature"] == 1.0 and s["top_k"] == 5
    assert s["sources"]["temperature"] == s["sources"]["top_k"] == "generation_config.json"
    assert s["sources"]["top_p"] == "quickstart"
