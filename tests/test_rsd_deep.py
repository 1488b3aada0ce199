"""Deep drafting, multi-round speculation, truncated decoding, relaxed-action acceptance and adaptive depth."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rsd_helpers import TableDraft, random_prefix, shift_codes, tiny_main, tiny_tokenizer

from rsd.action_space import ActionSpace
from rsd.config import RSDConfig
from rsd.draft import (
    DeepDraftConfig,
    DeepDraftModel,
    DraftTrainConfig,
    evaluate_deep_draft,
    load_draft,
    train_deep_draft,
)
from rsd.engine import CostModel, SpeculativeDecoder

torch.set_num_threads(1)
L = 8


@pytest.fixture(scope="module")
def main():
    return tiny_main(seed=0, hidden=32)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _engine(main, layers, **cfg) -> tuple[SpeculativeDecoder, TableDraft]:
    draft = TableDraft(layers)
    cfg.setdefault("mode", "exact")
    cfg.setdefault("adaptive", False)
    return SpeculativeDecoder(main, draft, RSDConfig(**cfg)), draft


def test_oracle_deep_draft_decodes_chunk_in_one_pass(main):
    x = random_prefix(0, 3)
    greedy = main.decode_greedy(x)
    eng, draft = _engine(main, greedy)
    tokens, stats = eng.generate(x)
    assert torch.equal(tokens, greedy)
    assert stats.main_passes == 1 and stats.rounds == 1 and stats.chosen_k == [7]
    assert stats.main_passes_per_sample == [1, 1, 1]
    assert stats.per_layer_acceptance == [1.0] * 7
    assert draft.calls == [1]


def test_rejection_speculates_again_from_the_repairedrandom_prefix(main):
    x = random_prefix(1, 1)
    greedy = main.decode_greedy(x)
    wrong = greedy.clone()
    wrong[:, 3] = shift_codes(wrong[:, 3])
    eng, draft = _engine(main, wrong, jacobi=False)
    tokens, stats = eng.generate(x)
    assert torch.equal(tokens, greedy)
    # round 1 keeps layers 1, 2 and repairs 3 from the same pass; round 2 drafts 4..7 from the decided prefix
    assert draft.calls == [1, 4]
    assert stats.main_passes == 2 and stats.chosen_k == [7, 4]
    assert stats.accepted[0].tolist() == [True, True, False, True, True, True, True]


def test_jacobi_rounds_reuse_main_logits_instead_of_the_draft(main):
    """After a rejection, layers past it are re-proposed from main's own logits of that pass: no draft call."""
    x = random_prefix(1, 2)
    greedy = main.decode_greedy(x)
    eng, draft = _engine(main, shift_codes(greedy), jacobi=True)
    tokens, stats = eng.generate(x)
    assert torch.equal(tokens, greedy)
    assert draft.calls == [1]  # only the first round asked the draft
    assert stats.rounds == stats.main_passes <= L - 1
    # main's guesses from a pass over the right prefix are its greedy layers: a round after a round whose
    # rejected layer was repaired accepts at least what main-only decoding would decide in one step
    eng2, _ = _engine(main, shift_codes(greedy), jacobi=False)
    _, stats2 = eng2.generate(x)
    assert stats.main_passes <= stats2.main_passes


def test_adversarial_deep_draft_never_needs_more_passes_than_main_only(main):
    x = random_prefix(2, 2)
    greedy = main.decode_greedy(x)
    eng, _ = _engine(main, shift_codes(greedy), jacobi=False)
    tokens, stats = eng.generate(x)
    assert torch.equal(tokens, greedy)
    assert stats.main_passes == L - 1  # every round repairs one layer, as a plain step would
    assert stats.per_layer_acceptance == [0.0] * 7


def test_deep_draft_batch_with_different_prefixes_is_exact(main):
    x = random_prefix(3, 4)
    greedy = main.decode_greedy(x)
    table = greedy.clone()
    table[1, 2] = shift_codes(table[1, 2])
    table[2, 5] = shift_codes(table[2, 5])
    table[3] = shift_codes(table[3])
    for max_rounds in (0, 1, 2):
        eng, _ = _engine(main, table, max_rounds=max_rounds)
        tokens, stats = eng.generate(x)
        assert torch.equal(tokens, greedy), max_rounds
        assert max(stats.main_passes_per_sample) <= stats.main_passes <= L - 1
    assert stats.main_passes_per_sample[0] == 1


@pytest.mark.parametrize("k", [1, 2, 3, 7])
def test_fixed_depth_rounds(main, k):
    x = random_prefix(4, 2)
    greedy = main.decode_greedy(x)
    eng, _ = _engine(main, greedy, draft_layers=k)
    tokens, stats = eng.generate(x)
    assert torch.equal(tokens, greedy)
    # each round: k drafted + 1 free layer; 7 layers after layer 0
    assert stats.main_passes == -(-(L - 1) // (k + 1))


def test_sampling_mode_with_deep_draft_runs_and_accepts_oracle(main):
    x = random_prefix(5, 2)
    eng, _ = _engine(main, main.decode_greedy(x), mode="sampling", seed=3)
    tokens, stats = eng.generate(x)
    assert tokens.shape == (2, L, 128) and int(tokens.max()) < 7 and stats.main_passes <= L - 1


@pytest.mark.parametrize("depth", [1, 3, 8])
def test_truncated_main_only_decodes_first_layers(main, depth):
    x = random_prefix(6, 2)
    greedy = main.decode_greedy(x)
    eng = SpeculativeDecoder(main, None, RSDConfig(enabled=False, decode_layers=depth))
    tokens, stats = eng.generate(x)
    assert torch.equal(tokens[:, :depth], greedy[:, :depth])
    assert stats.main_passes == depth - 1 and stats.decoded_layers == depth
    spec, _ = _engine(main, greedy, decode_layers=depth)
    tokens2, stats2 = spec.generate(x)
    assert torch.equal(tokens2[:, :depth], greedy[:, :depth])
    assert stats2.main_passes == (1 if depth > 1 else 0)


def test_truncated_decode_uses_that_many_layers(main, tokenizer):
    x = random_prefix(7, 2)
    eng = SpeculativeDecoder(main, None, RSDConfig(enabled=False, decode_layers=3, action_decode="greedy"),
                             tokenizer=tokenizer)
    tokens, _ = eng.generate(x)
    torch.testing.assert_close(eng.decode_actions(tokens), tokenizer.decode(tokenizer.layers_to_tokens(tokens), 3))


def test_relaxed_action_zero_tolerance_is_exact_and_infinite_accepts_all(main, tokenizer):
    x = random_prefix(8, 3)
    greedy = main.decode_greedy(x)
    noisy = shift_codes(greedy)
    eng0 = SpeculativeDecoder(main, TableDraft(noisy), RSDConfig(mode="relaxed-action", adaptive=False,
                                                                 action_eps_mm=0.0, action_eps_deg=0.0),
                              tokenizer=tokenizer)
    tokens, stats = eng0.generate(x)
    assert torch.equal(tokens, greedy) and stats.main_passes == L - 1
    assert stats.action_dev_mm.tolist() == [0.0] * 3
    big = SpeculativeDecoder(main, TableDraft(noisy), RSDConfig(mode="relaxed-action", adaptive=False,
                                                                action_eps_mm=1e9, action_eps_deg=1e9),
                             tokenizer=tokenizer)
    tokens, stats = big.generate(x)
    # the gripper sign still has to agree, so a flipped gripper is the only thing that can reject here
    assert stats.main_passes >= 1
    assert bool((stats.action_dev_mm > 0).any())


def test_relaxed_action_bounds_each_kept_layer(main, tokenizer):
    """Every kept drafted layer moved the chunk by at most eps against main's choice for it (checked directly)."""
    x = random_prefix(9, 4)
    greedy = main.decode_greedy(x)
    g = torch.Generator().manual_seed(0)
    noisy = torch.where(torch.rand(greedy.shape, generator=g) < 0.05, shift_codes(greedy), greedy)
    eps = 25.0  # a random decoder is steep (45 mm per normalised unit): a few wrong codes move it mm
    eng = SpeculativeDecoder(main, TableDraft(noisy), RSDConfig(mode="relaxed-action", adaptive=False,
                                                                action_eps_mm=eps, action_eps_deg=eps),
                             tokenizer=tokenizer)
    tokens, stats = eng.generate(x)
    kept = int(stats.accepted.sum())
    assert kept > 0
    assert bool((stats.action_dev_mm <= eps * stats.accepted.sum(1) + 1e-5).all())
    assert bool((stats.action_dev_deg <= eps * stats.accepted.sum(1) + 1e-5).all())
    space = ActionSpace(tokenizer)
    d = space.chunk_deviation(tokens, greedy)
    assert d.pos_mm.shape == (4,) and bool((d.gripper_flips >= 0).all())


def test_relaxed_action_needs_tokenizer(main):
    with pytest.raises(ValueError, match="tokenizer"):
        SpeculativeDecoder(main, TableDraft(torch.zeros(1, L, 128, dtype=torch.long)), RSDConfig(mode="relaxed-action"))


def test_action_space_units(tokenizer):
    space = ActionSpace(tokenizer)
    a = torch.zeros(1, 8, 7)
    b = a.clone()
    b[0, 2, 0] = 0.1  # 0.1 normalised units of x: 0.1 * 0.9 (half range) * 50 mm
    b[0, 4, 5] = 0.5  # rotation: 0.5 * 0.2 * 0.5 rad
    b[0, 1, 6] = 0.5  # gripper sign flip (0 counts as open)
    d = space.deviation(a, b)
    assert d.pos_mm.item() == pytest.approx(4.5, rel=1e-5)
    assert d.rot_deg.item() == pytest.approx(np.degrees(0.05), rel=1e-5)
    assert d.gripper_flips.item() == 1


def test_cost_model_plans_full_depth_when_drafts_are_accepted_and_none_when_not():
    cm = CostModel(L)
    cm.pass_ms = {n: 1.0 + 0.05 * (n - 1) for n in range(1, L)}
    cm.draft_ms = 0.1
    cm.acceptance = [0.99] * L
    # drafting 1..6 and taking layer 7 free from the same 7-token pass beats drafting layer 7 too
    assert cm.plan(L, L - 1, 1)[1] == L - 2
    cm.acceptance = [0.01] * L
    assert cm.plan(L, L - 1, 1)[1:L] == [0] * (L - 1)
    cm.acceptance = [0.8] * L
    # a batch accepts a layer only when every sample does: deep rounds stop paying for large batches
    assert sum(cm.plan(L, L - 1, 32)[1:L]) == 0
    assert cm.plan(L, L - 1, 1)[1] > 0


def test_cost_model_acceptance_replaces_the_prior_with_the_first_measurements_then_moves_as_an_ema():
    cm = CostModel(L, momentum=0.1, prior_acceptance=0.5)
    cm.pass_ms = {n: 1.0 + 0.05 * (n - 1) for n in range(1, L)}
    cm.draft_ms = 0.1
    assert cm.plan(L, L - 1, 1)[1] > 0  # the optimistic prior drafts before anything is measured
    for layer in range(L):
        cm.observe_acceptance(layer, 0.0)  # one full-depth probe: the draft got no layer right
    assert cm.acceptance == [0.0] * L
    assert cm.plan(L, L - 1, 1)[1:L] == [0] * (L - 1)  # so the next chunk is decoded main-only
    cm.observe_acceptance(1, 1.0)
    assert cm.acceptance[1] == pytest.approx(0.5)  # the mean of the two observations
    for _ in range(8):
        cm.observe_acceptance(1, 1.0)
    assert cm.acceptance[1] == pytest.approx(0.9)  # 9 of 10
    cm.observe_acceptance(1, 0.0)  # past 1 / momentum observations: an EMA with momentum 0.1
    assert cm.acceptance[1] == pytest.approx(0.81)


def _fixed_costs(eng: SpeculativeDecoder) -> None:
    """CPU-like costs (a pass over n tokens a little dearer than a step, a cheap draft), not timed: deterministic."""
    eng.costs.pass_ms = {n: 1.0 + 0.05 * (n - 1) for n in range(1, L)}
    eng.costs.draft_ms = 0.2
    eng.costs.frozen_costs = True


def test_adaptive_falls_back_to_main_only_for_a_useless_draft(main):
    x = random_prefix(10, 1)
    greedy = main.decode_greedy(x)
    eng, draft = _engine(main, shift_codes(greedy), adaptive=True, probe_every=0, jacobi=False)
    _fixed_costs(eng)
    for _ in range(40):
        tokens, stats = eng.generate(x)
        assert torch.equal(tokens, greedy)
    assert stats.rounds == 0 and stats.chosen_k == [0] * (L - 1)  # learnt: nothing is ever accepted
    eng2, _ = _engine(main, greedy, adaptive=True, probe_every=0)
    _fixed_costs(eng2)
    for _ in range(40):  # acceptance estimates start at 0.5 and follow the observed rate
        _, stats2 = eng2.generate(x)
    assert stats2.rounds == 1 and stats2.main_passes == 1


def test_calibrate_measures_every_pass_width(main):
    x = random_prefix(11, 1)
    eng, _ = _engine(main, main.decode_greedy(x))
    costs = eng.calibrate(x, reps=2)
    assert set(costs) == {"prefill_ms", "draft_ms"} | {f"pass{n}_ms" for n in range(1, L)}
    assert all(v > 0 for v in costs.values()) and eng.costs.pass_ms[3] == costs["pass3_ms"]


def test_deep_draft_save_load_and_distillation(tmp_path, main):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 6, 32, generator=g)
    hidden = main.prefill(x).hidden_last
    layers = main.decode_greedy(x)
    draft = DeepDraftModel(DeepDraftConfig(input_dim=32, hidden_dim=64))
    before = evaluate_deep_draft(draft, hidden, layers)
    train_deep_draft(draft, hidden, layers, DraftTrainConfig(steps=150, batch_size=32, lr=3e-3, warmup_steps=10))
    after = evaluate_deep_draft(draft, hidden, layers)
    assert np.mean(after["round1_code_accuracy"]) > np.mean(before["round1_code_accuracy"]) + 0.1
    assert len(after["given_prefix_layer_agreement"]) == L - 1
    for m in (1, 4, 7):  # the inference path (one embedding_bag) equals the training view
        full = draft.all_logits(hidden[:3], layers[:3], torch.full((3,), m, dtype=torch.long))[:, m:]
        torch.testing.assert_close(draft(hidden[:3], layers[:3, :m]), full, rtol=1e-4, atol=1e-4)
    draft.save(tmp_path)
    loaded = load_draft(tmp_path)
    assert isinstance(loaded, DeepDraftModel)
    torch.testing.assert_close(loaded(hidden[:2], layers[:2, :3]), draft(hidden[:2], layers[:2, :3]))
    tokens, _ = SpeculativeDecoder(main, loaded, RSDConfig(mode="exact")).generate(x[:4])
    assert torch.equal(tokens, layers[:4])
