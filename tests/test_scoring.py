"""The shared scorers (modalkv.scoring) on small hand-made tensors, and the benchmark's score memo."""

import pytest
import torch

from modalkv import scoring
from modalkv.bench.memo import ScoreMemo


def dense_probs(q, k, scaling, real):
    """Causal softmax attention of every query row, computed the plain way (GQA by repeating keys)."""
    B, Hq, n, _ = q.shape
    kk = k.repeat_interleave(Hq // k.shape[1], dim=1)
    logits = (q @ kk.transpose(-1, -2)) * scaling
    mask = torch.ones(n, n, dtype=torch.bool).tril() & real[:, None, None, :]
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    return probs * real[:, None, :, None]


def random_qk(n=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 4, n, 8, generator=g), torch.randn(1, 2, n, 8, generator=g)
    real = torch.ones(1, n, dtype=torch.bool)
    real[0, :3] = False  # left padding
    return q, k, real


def test_attention_probs_on_two_keys():
    """One query head, one key head: the second query sees both keys with weights from its logits; the first
    only itself; a padding key gets nothing."""
    q = torch.tensor([[[[1.0, 0.0], [2.0, 0.0]]]])  # [1, 1, 2, 2]
    k = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]])
    real = torch.ones(1, 2, dtype=torch.bool)
    p = scoring.attention_probs(q, k, 1.0, torch.arange(2), real)
    e = torch.exp(torch.tensor(2.0))
    torch.testing.assert_close(p[0, 0], torch.tensor([[1.0, 0.0], [e / (e + 1), 1 / (e + 1)]]))
    real[0, 0] = False
    p = scoring.attention_probs(q, k, 1.0, torch.arange(2), real)
    torch.testing.assert_close(p[0, 0], torch.tensor([[0.0, 0.0], [0.0, 1.0]]))  # a padding query row is zero


def test_window_and_accumulated_scores_equal_dense_sums():
    q, k, real = random_qk()
    p = dense_probs(q, k, 0.3, real)
    torch.testing.assert_close(scoring.accumulated_scores(q, k, 0.3, real, chunk=5), p.sum(2), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(scoring.window_scores(q, k, 0.3, 6, real, chunk=4), p[:, :, -6:].sum(2),
                               atol=1e-5, rtol=1e-5)


def test_score_memo_reuses_copies_and_forgets():
    """Inside ScoreMemo.active() a second call on the same tensors is not recomputed and returns an independent
    copy; a changed key tensor is recomputed; the entry dies with its query tensor; outside, nothing is kept."""
    q, k, real = random_qk()
    expected = dense_probs(q, k, 0.3, real).sum(2)
    memo, calls = ScoreMemo(), []

    def counting(*args):
        calls.append(1)
        return scoring.causal_column_sums(*args)

    first = memo(counting, q, k, 0.3, real, 5)
    first.zero_()  # a caller modifying its scores does not change the memo
    torch.testing.assert_close(memo(counting, q, k, 0.3, real, 5), expected, atol=1e-5, rtol=1e-5)
    assert len(calls) == 1
    k[:, :, 5] *= 3.0  # changed in place: its version counter moves, so the scores are computed again
    assert not torch.allclose(memo(counting, q, k, 0.3, real, 5), expected, atol=1e-3)
    assert len(calls) == 2
    q2, k2, real2 = random_qk(seed=1)
    with memo.active():  # the scorer asks the installed memo, which remembers the result
        torch.testing.assert_close(scoring.accumulated_scores(q2, k2, 0.3, real2, chunk=5),
                                   dense_probs(q2, k2, 0.3, real2).sum(2), atol=1e-5, rtol=1e-5)
    assert id(q2) in memo.entries and scoring.accumulated_memo.get() is None
    scoring.accumulated_scores(q2 + 0, k2, 0.3, real2)
    assert len(memo.entries) == 2  # outside the block nothing is remembered
    key = id(q)
    assert key in memo.entries
    del q
    assert key not in memo.entries  # the memo does not outlive the query tensor
    small = ScoreMemo(size=2)
    tensors = [random_qk(n=5, seed=s) for s in range(3)]
    for q_, k_, real_ in tensors:
        small(scoring.causal_column_sums, q_, k_, 0.5, real_, 4)
    assert list(small.entries) == [id(tensors[1][0]), id(tensors[2][0])]  # bounded, oldest dropped first


def test_group_reduce_and_pooling():
    s = torch.tensor([[[1.0, 2.0, 3.0], [3.0, 0.0, 1.0], [5.0, 5.0, 5.0], [1.0, 1.0, 1.0]]])  # [1, Hq=4, 3]
    torch.testing.assert_close(scoring.group_reduce(s, 2), torch.tensor([[[2.0, 1.0, 2.0], [3.0, 3.0, 3.0]]]))
    torch.testing.assert_close(scoring.group_reduce(s, 2, "max"), torch.tensor([[[3.0, 2.0, 3.0], [5.0, 5.0, 5.0]]]))
    with pytest.raises(ValueError, match="GQA reduction"):
        scoring.group_reduce(s, 2, "median")
    x = torch.tensor([[[0.0, 4.0, 0.0, 0.0, 2.0]]])
    torch.testing.assert_close(scoring.pool1d(x, 3), torch.tensor([[[4.0, 4.0, 4.0, 2.0, 2.0]]]))
    torch.testing.assert_close(scoring.pool1d(x, 3, "avg"), torch.tensor([[[2.0, 4 / 3, 4 / 3, 2 / 3, 1.0]]]))
    assert scoring.pool1d(x, 1) is x
    with pytest.raises(ValueError, match="pooling"):
        scoring.pool1d(x, 3, "min")


def test_check_finite_refuses_nan():
    scoring.check_finite(torch.tensor([float("inf"), 1.0]), "m")  # -inf/inf are meaningful scores
    with pytest.raises(FloatingPointError, match="mymethod"):
        scoring.check_finite(torch.tensor([float("nan"), 1.0]), "mymethod")


def test_select_topk_ties_padding_force_and_caps():
    scores = torch.tensor([[[1.0, 5.0, 5.0, 2.0, 9.0]]])
    real = torch.tensor([[True, True, True, True, False]])  # the best score is padding: never kept
    got = scoring.select_topk(scores, torch.tensor([2]), real)
    assert got.tolist() == [[[1, 2]]]  # sorted ascending
    got = scoring.select_topk(torch.ones(1, 1, 5), torch.tensor([2]), torch.ones(1, 5, dtype=torch.bool))
    assert got.tolist() == [[[0, 1]]]  # ties go to the earlier position
    force = torch.tensor([[True, False, False, False, False]])
    assert scoring.select_topk(scores, torch.tensor([2]), real, force=force).tolist() == [[[0, 1]]]  # counts toward k
    modality = torch.tensor([[1, 1, 1, 0, 0]])  # three image entries, one text entry (and padding)
    caps = {1: torch.tensor([1])}  # at most one image entry
    assert scoring.select_topk(scores, torch.tensor([3]), real, modality=modality, caps=caps).tolist() == [[[1, 3, -1]]]
    per_head = scoring.select_topk(scores.expand(1, 2, 5), torch.tensor([[1, 3]]), real)
    assert per_head.tolist() == [[[1, -1, -1], [1, 2, 3]]]  # -1 where a head keeps fewer


def test_mask_to_sorted_and_largest_remainder():
    idx = torch.tensor([[[4, 0, 2]]])
    ok = torch.tensor([[[True, False, True]]])
    assert scoring.mask_to_sorted(idx, ok, 5).tolist() == [[[2, 4, -1]]]
    shares = scoring.largest_remainder(torch.tensor([[1.0, 1.0, 1.0], [3.0, 1.0, 0.0]]), torch.tensor([10, 7]))
    assert shares.tolist() == [[4, 3, 3], [5, 2, 0]]
    assert shares.sum(-1).tolist() == [10, 7]
    assert scoring.largest_remainder(torch.tensor([[-1.0, 2.0]]), torch.tensor([3])).tolist() == [[0, 3]]
