"""Bin packing of documents into rows: both algorithms place every document once, never overfill a
row, and minimum bin slack fills rows at least as well as first-fit-decreasing."""

from __future__ import annotations

import numpy as np
import pytest

from mmgen.data.packing import first_fit_decreasing, minimum_bin_slack, pack_sequences


def _valid(rows, lengths, cap):
    assert sorted(j for r in rows for j in r) == list(range(len(lengths)))
    assert all(sum(lengths[j] for j in r) <= cap for r in rows)


def test_mbs_finds_the_exact_fits_ffd_misses():
    # FFD puts 300, 150 and 50 together (12 free); 300 + 112 + 100 fills the row exactly.
    lengths = [300, 200, 150, 112, 100, 50, 312]
    cap = 512
    ffd, mbs = first_fit_decreasing(lengths, cap), minimum_bin_slack(lengths, cap)
    _valid(ffd, lengths, cap)
    _valid(mbs, lengths, cap)
    assert len(mbs) == 3 and len(ffd) == 3
    assert sorted(sum(lengths[j] for j in r) for r in mbs)[-2:] == [512, 512]
    assert sorted(sum(lengths[j] for j in r) for r in ffd)[-2:] == [500, 512]


def test_mbs_fill_on_a_multimodal_length_mix():
    # caption docs ~ 90-110 tokens (one 8x8 image block), QA ~ 110-140, build-ups 250-450
    rng = np.random.default_rng(0)
    lengths = [
        int(x)
        for x in np.concatenate([rng.integers(90, 111, 300), rng.integers(110, 141, 150), rng.integers(250, 451, 150)])
    ]
    cap = 512
    ffd, mbs = first_fit_decreasing(lengths, cap), minimum_bin_slack(lengths, cap)
    _valid(mbs, lengths, cap)
    fill = lambda rows: sum(lengths) / (len(rows) * cap)  # noqa: E731
    assert fill(mbs) >= fill(ffd)
    assert len(mbs) <= -(-sum(lengths) // cap) * 1.05  # within 5% of the lower bound


@pytest.mark.parametrize("algorithm", ["ffd", "mbs"])
def test_pack_sequences_layout_with_either_algorithm(algorithm):
    rng = np.random.default_rng(1)
    seqs = [
        {"input_ids": rng.integers(5, 50, size=n), "loss_mask": np.ones(n, bool), "boundaries": [1, n - 1]}
        for n in rng.integers(10, 60, size=20)
    ]
    rows, stats = pack_sequences(seqs, 64, algorithm=algorithm)
    assert stats.tokens == sum(len(s["input_ids"]) for s in seqs) and stats.docs_dropped == 0
    for r in range(stats.rows):
        seg = rows["segment_ids"][r]
        for s in np.unique(seg[seg >= 0]):
            where = np.flatnonzero(seg == s)
            d = rows["doc_index"][r, where[0]]
            assert np.array_equal(rows["input_ids"][r, where], seqs[d]["input_ids"])
            assert np.array_equal(rows["position_ids"][r, where], np.arange(len(where)))
    with pytest.raises(ValueError, match="ffd' or 'mbs"):
        pack_sequences(seqs, 64, algorithm="nfd")
