"""RetentiveKV's gates fitted on calibration text: the fit lowers its own objective, is remembered per model and
deterministic, leaves the backbone unchanged, travels with a saved cache, and bad input is refused."""

import pytest
import torch

from helpers import prompt, run_steps, tiny_llama
from modalkv import KVCache, load_cache, save_cache
from modalkv.methods import make_method, parse_label
from modalkv.methods import retentive_fit as rf
from modalkv.methods.retentivekv import RetentiveKV

SMALL = {"window": 4, "n_sink": 2}
# a small fit for the tiny model: two 48-token prompts of seeded random ids (the tiny model has no tokenizer)
SETTINGS = {"prompts": 2, "tokens": 48, "steps": 4, "budget": 0.4, "rounds": 1}
GRID = {"gate_centre": (0.0, 0.5), "h_min": (0.5, 0.9), "gate_w": (0.0, 8.0), "gate_b": (-4.0, 2.0)}


def _base():
    return RetentiveKV(**SMALL)


@pytest.fixture
def model():
    return tiny_llama(seed=3)


def test_the_fit_lowers_its_own_objective(model):
    report = rf.fit_gates(model, _base(), grid=GRID, **SETTINGS)
    assert report.params != report.start
    assert report.objective < report.objective_start
    # recomputed independently of the fit's bookkeeping
    objective = rf._Objective(model, rf.calibration_prompts(model, 2, 48, 4), 0.4, _base())
    assert objective(report.params) == pytest.approx(report.objective)
    assert objective(report.params) < objective(report.start)
    assert report.candidates == len(report.trace) and report.forwards > 0 and report.seconds > 0


def test_the_fit_is_remembered_per_model_and_deterministic(model, monkeypatch):
    first = rf.fit_gates(model, _base(), grid=GRID, **SETTINGS)

    def no_work(*args, **kwargs):
        raise AssertionError("the second call re-ran the fit")

    monkeypatch.setattr(rf, "_Objective", no_work)
    assert rf.fit_gates(model, _base(), grid=GRID, **SETTINGS) is first
    monkeypatch.undo()
    rf.FITTED.clear()
    again = rf.fit_gates(model, _base(), grid=GRID, **SETTINGS)
    assert again is not first and again.params == first.params and again.objective == first.objective


def test_the_fit_leaves_the_backbone_unchanged(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rf.fit_gates(model, _base(), grid=GRID, **SETTINGS)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad and p.grad is not None for p in model.parameters())


def test_gates_fit_uses_the_fitted_values_and_a_saved_cache_carries_them(model, monkeypatch, tmp_path):
    monkeypatch.setattr(rf, "FIT_SETTINGS", SETTINGS)
    monkeypatch.setattr(rf, "GRID", GRID)
    ids = prompt(40)
    cache = KVCache(model, "retentivekv", 0.4, gates="fit", **SMALL)
    want = rf.fit_gates(model, RetentiveKV(**SMALL), **SETTINGS).params
    assert cache.method.gate_params == want != RetentiveKV().gate_params
    assert cache.method.fit_report.params == want
    # the fitted gates change the decode against the hand values (same selection, same budget)
    fitted, fed = run_steps(model, ids, None, cache, 4)
    hand, _ = run_steps(model, ids, None, KVCache(model, "retentivekv", 0.4, **SMALL), 4, feed=fed)
    assert any(not torch.allclose(f, h) for f, h in zip(fitted, hand))
    # a saved cache holds the fitted numbers: they are used on load even if the fit in this process differs
    fresh = KVCache(model, "retentivekv", 0.4, gates="fit", **SMALL)
    run_steps(model, ids, None, fresh, 1)
    path = tmp_path / "fit.safetensors"
    save_cache(fresh, path)
    rf.FITTED[model][next(iter(rf.FITTED[model]))].params = want.replace(gate_b=-123.0)  # a different fit in memory
    loaded = load_cache(path, model)
    assert loaded.method.gates == "fit" and loaded.method.gate_params == want


def test_bench_label_and_bad_input():
    name, params, _ = parse_label("retentivekv(gates=fit)")
    assert make_method(name, **params).gates == "fit"
    with pytest.raises(ValueError, match="gates must be 'hand'.*'fit'.*got 'bogus'"):
        RetentiveKV(gates="bogus")
    with pytest.raises(ValueError, match="state_readout='none'"):
        RetentiveKV(gates="fit", state_readout="none")
    with pytest.raises(ValueError, match="build it in a KVCache"):
        RetentiveKV(gates="fit").setup(None)
    with pytest.raises(ValueError, match="unknown gate parameters in grid: bogus"):
        rf.fit_gates(tiny_llama(), RetentiveKV(), grid={"bogus": (1.0,)})
    with pytest.raises(TypeError, match="method must be a RetentiveKV instance, got dict"):
        rf.fit_gates(tiny_llama(), {"h_min": 0.5})
    with pytest.raises(ValueError, match="budget must be in"):
        rf.fit_gates(tiny_llama(), RetentiveKV(), budget=1.0)


def test_the_hand_gates_are_the_fields():
    m = RetentiveKV(h_min=0.7, beta=3.0, gate_centre=0.2, query_centre=0.4, gate_w=2.0, gate_b=-1.0)
    m.setup(None)
    assert m.gate_params == rf.GateParams(0.7, 3.0, 0.2, 0.4, 2.0, -1.0)
    assert RetentiveKV().gate_params == rf.HAND
