"""Models: the vocabulary and sequence layout, the unified LM, projectors and detokenizers."""
