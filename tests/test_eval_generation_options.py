"""Evaluation with generation options: every suite's generation runs with the KV cache and accelerations a
GenerationOptions chooses (what benchmarks/inference.py measures accuracy with), and build-up documents of
many pictures for long-context methods."""

from __future__ import annotations

from bundlekit import make_tiny_bundle


def _caches_seen(model):
    """Record the class of the cache every forward of ``model`` fills."""
    seen = []

    def hook(module, args, kwargs):
        c = kwargs.get("cache", kwargs.get("past_key_values"))
        seen.append(type(c).__name__)

    return seen, model.register_forward_pre_hook(hook, with_kwargs=True)


def test_every_suite_generates_with_the_options_cache(tmp_path):
    from mmgen.eval.t2i import evaluate_t2i
    from mmgen.eval.understanding import evaluate_interleaved, evaluate_qa
    from mmgen.inference.pipeline import GenerationOptions

    bundle = make_tiny_bundle(tmp_path / "b")
    fp8 = GenerationOptions(cache="fp8")
    for run in (
        lambda o: evaluate_t2i(bundle, n=2, splits=("val",), cfg_scale=2.0, options=o),
        lambda o: evaluate_qa(bundle, n=2, splits=("val",), options=o),
        lambda o: evaluate_interleaved(bundle, n=2, options=o),
    ):
        seen, handle = _caches_seen(bundle.model)
        plain = run(None)
        assert seen and set(seen) == {"DynamicCache"}
        seen.clear()
        quantized = run(fp8)
        handle.remove()
        assert seen and set(seen) == {"QuantizedCache"}
        assert quantized["splits"].keys() == plain["splits"].keys()


def test_buildup_cases_with_many_pictures_are_cut_before_the_last():
    from mmgen.eval.understanding import buildup_cases

    cases = buildup_cases(12, "val", seed=3, res=(32, 32), min_images=4)
    assert len(cases) == 12
    for c in cases:
        shown = [it for it in c["items"] if it.kind == "image"]
        assert len(shown) >= 3  # the document has >= 4 pictures and the last one is to be drawn
        assert c["instruction"] == c["items"][-1].text and c["truth"]["objects"] is not None
        assert shown[-1].meta["step"] == len(shown) - 1
    # without min_images: the cases the suite always drew
    assert [c["instruction"] for c in buildup_cases(5, "val", 3, (32, 32))] == [
        c["instruction"] for c in buildup_cases(5, "val", 3, (32, 32), min_images=0)
    ]
    assert min(sum(it.kind == "image" for it in c["items"]) for c in buildup_cases(30, "val", 3, (32, 32))) == 1


def test_qa_under_pruning_reads_fewer_prefill_tokens(tmp_path):
    import pytest

    from mmgen.errors import MMGenError
    from mmgen.eval.understanding import evaluate_qa
    from mmgen.inference.pipeline import GenerationOptions

    bundle = make_tiny_bundle(tmp_path / "b")
    widths = []

    def hook(module, args, kwargs):
        x = kwargs.get("input_ids")
        x = kwargs.get("inputs_embeds") if x is None else x
        if x.shape[1] > 1:  # a prefill
            widths.append(int(x.shape[1]))

    handle = bundle.model.register_forward_pre_hook(hook, with_kwargs=True)
    evaluate_qa(bundle, n=3, splits=("val",))
    plain = list(widths)
    widths.clear()
    evaluate_qa(bundle, n=3, splits=("val",), options=GenerationOptions(prune_method="merge", prune_ratio=0.25))
    handle.remove()
    # the 4x4 picture of each question keeps 4 of its 16 codes
    assert len(widths) == len(plain) == 1 and widths[0] == plain[0] - 12
    with pytest.raises(MMGenError, match="prune_ratio must be in"):
        evaluate_qa(bundle, n=3, splits=("val",), options=GenerationOptions(prune_method="merge", prune_ratio=0))
