"""The Vocab lives in :mod:`mmgen.processing.vocab`; this name stays for the code that imports it from here."""

from mmgen.processing.vocab import GRID_BRANCHES, STRUCTURAL, Vocab, VocabConfig  # noqa: F401
