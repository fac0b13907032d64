"""Budgets (modalkv.budget): validation, resolution per row, modality caps and decode targets."""

import pytest
import torch

from modalkv.budget import MAX_TOKENS, Budget, check_budget_value, parse_caps, resolve
from modalkv.modality import IMAGE, TEXT


def test_ratio_and_absolute_budgets_resolve_per_row():
    n = torch.tensor([10, 3, 0])
    assert resolve(0.25, n).tolist() == [3, 1, 0]  # ceil, at least 1 when the row has tokens, never above n
    assert resolve(5, n).tolist() == [5, 3, 0]  # an absolute budget above the prompt keeps the prompt
    assert Budget(1.0).tokens(n).tolist() == [10, 3, 0]
    assert Budget(1).tokens(n).tolist() == [1, 1, 0]  # int 1 is one token, float 1.0 the whole prompt
    assert Budget(0.5).is_ratio and not Budget(4).is_ratio


@pytest.mark.parametrize("bad, error", [(0.0, ValueError), (1.5, ValueError), (float("nan"), ValueError),
                                        (0, ValueError), (-3, ValueError), (MAX_TOKENS + 1, ValueError),
                                        (True, TypeError), ("0.5", TypeError), (None, TypeError)])
def test_bad_budget_values_are_refused(bad, error):
    with pytest.raises(error, match="budget"):
        Budget(bad)


def test_bad_caps_and_decode_budgets_are_refused():
    with pytest.raises(ValueError, match="unknown modality 'pixels'"):
        Budget(0.5, {"pixels": 0.1})
    with pytest.raises(TypeError, match="modality_caps must be a dict"):
        Budget(0.5, [("image", 0.1)])
    with pytest.raises(ValueError, match="modality cap for 'image'"):
        Budget(0.5, {"image": 2.0})
    with pytest.raises(TypeError, match="decode_budget must be an int"):
        Budget(0.5, decode=0.5)
    with pytest.raises(ValueError, match="decode_budget"):
        Budget(0.5, decode=0)
    check_budget_value(MAX_TOKENS, "budget")  # the largest allowed count passes


def test_parse_caps():
    assert parse_caps("image=0.1, text=0.5") == {"image": 0.1, "text": 0.5}
    assert parse_caps("") == {}
    with pytest.raises(ValueError, match="write <modality>=<ratio>"):
        parse_caps("picture=0.1")
    with pytest.raises(ValueError, match="is not a number"):
        parse_caps("image=lots")
    with pytest.raises(ValueError, match="ratio must be in"):
        parse_caps("image=1.5")


def test_caps_count_only_real_entries_of_their_modality():
    modality = torch.tensor([[IMAGE] * 6 + [TEXT] * 4, [IMAGE] * 2 + [TEXT] * 8])
    real = torch.ones(2, 10, dtype=torch.bool)
    real[0, :2] = False  # two padding entries marked image in row 0 do not count
    caps = Budget(0.5, {"image": 0.5, "text": 3}).caps(modality, real)
    assert caps[IMAGE].tolist() == [2, 1]  # ceil(0.5 * 4), ceil(0.5 * 2)
    assert caps[TEXT].tolist() == [3, 3]
    assert Budget(0.5).caps(modality, real) == {}


def test_decode_targets_ratio_absolute_and_bound():
    kept, seen = torch.tensor([5, 5]), torch.tensor([20, 40])
    ratio = Budget(0.25)
    assert ratio.decode_targets(kept, seen).tolist() == [5, 10]  # never below the prefill size, then ceil(r * seen)
    assert Budget(1.0).decode_targets(kept, seen).tolist() == [20, 40]  # budget 1.0 never evicts
    absolute = Budget(8)
    assert absolute.decode_targets(kept, seen).tolist() == [5, 5]  # a fixed-size cache
    assert absolute.decode_targets(kept, seen, torch.tensor([5, 20])).tolist() == [8, 5]  # short prompt: a window
    assert Budget(0.5, decode=12).decode_targets(kept, seen).tolist() == [10, 12]
    for b in (ratio, absolute, Budget(0.5, decode=12), Budget(30)):  # the one-row form agrees with the batched one
        for k, s, p in [(5, 20, 5), (5, 40, 20), (3, 7, 3)]:
            batched = b.decode_targets(torch.tensor([k]), torch.tensor([s]), torch.tensor([p]))
            assert b.decode_target(k, s, p) == int(batched[0])
        assert b.decode_target(5, 40) == int(b.decode_targets(torch.tensor([5]), torch.tensor([40]))[0])
