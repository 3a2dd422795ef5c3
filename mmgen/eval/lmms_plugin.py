"""lmms-eval's entry point for mmgen (group ``lmms_eval.models``, declared in pyproject.toml):
``--model mmgen`` resolves to :class:`mmgen.eval.lmms_model.MMGenLMM`. Kept apart from the model
module so that reading the manifest imports nothing heavy."""

from __future__ import annotations

MODEL_ID = "mmgen"
MODEL_CLASS = "mmgen.eval.lmms_model.MMGenLMM"


def manifest():
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=MODEL_CLASS)
