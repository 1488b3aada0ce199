"""RSD engine: exact mode equals main-only greedy decoding, pass counting, cache truncation, relaxed mode."""

from __future__ import annotations

import pytest
import torch
from rsd_helpers import FixedDraft, shift_codes, tiny_main

from rsd.acceptance import accept_relaxed
from rsd.config import RSDConfig
from rsd.draft import RFSQDraftModel
from rsd.engine import SpeculativeDecoder

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def main():
    return tiny_main(seed=0, hidden=32)


@pytest.fixture(scope="module")
def sharp_main():
    return tiny_main(seed=1, hidden=32, sharpen=20.0)


def _prefix(seed: int, b: int, p: int = 6, hidden: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, p, hidden, generator=g)


def test_oracle_draft_accepts_everything(main):
    x = _prefix(0, 4)
    greedy = main.decode_greedy(x)
    eng = SpeculativeDecoder(main, FixedDraft(tokens=greedy[:, :3]), RSDConfig(mode="exact"))
    tokens, stats = eng.generate(x)
    assert torch.equal(tokens, greedy)
    assert stats.per_layer_acceptance == [1.0, 1.0, 1.0]
    # 1 verification pass + decode layers 4..7 (4 steps) instead of 7 steps
    assert stats.main_passes == 5
    assert stats.main_passes_per_sample == [5, 5, 5, 5]


def test_adversarial_draft_accepts_nothing_and_still_matches(main):
    x = _prefix(1, 3)
    greedy = main.decode_greedy(x)
    eng = SpeculativeDecoder(main, FixedDraft(tokens=shift_codes(greedy[:, :3])), RSDConfig(mode="exact"))
    tokens, stats = eng.generate(x)
    assert torch.equal(tokens, greedy)
    assert stats.per_layer_acceptance == [0.0, 0.0, 0.0]
    assert stats.main_passes == 7  # never more passes than main-only decoding
    assert stats.reached[:, 2].sum() == 0  # d_2 is never checked once d_1 failed


def test_mixed_batch_per_sample_acceptance(main):
    """Samples accepting different prefixes: crop to the batch minimum, re-feed, still exact."""
    x = _prefix(2, 4)
    greedy = main.decode_greedy(x)
    draft = greedy[:, :3].clone()
    draft[1, 2] = shift_codes(draft[1, 2])  # sample 1: d_2 wrong
    draft[2, 1] = shift_codes(draft[2, 1])  # sample 2: d_1 wrong (d_2 correct but discarded)
    draft[3, 0] = shift_codes(draft[3, 0])  # sample 3: d_0 wrong, repaired from p_0; d_1, d_2 still accepted
    eng = SpeculativeDecoder(main, FixedDraft(tokens=draft), RSDConfig(mode="exact"))
    tokens, stats = eng.generate(x)
    assert torch.equal(tokens, greedy)
    assert stats.accepted.tolist() == [
        [True, True, True],
        [True, True, False],
        [True, False, False],
        [False, True, True],
    ]
    assert stats.main_passes_per_sample == [5, 6, 7, 5]
    assert stats.main_passes == 7  # the slowest sample sets the batch's pass count


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exact_mode_bit_identical_on_many_inputs(dtype):
    """Random, partially correct and bad drafts, B in {1, 3}, left padding: always main-only greedy."""
    main = tiny_main(seed=3, hidden=32, sharpen=5.0, dtype=dtype)
    random_draft = RFSQDraftModel(input_dim=32, hidden_dim=64, feedforward_dim=128, num_heads=4).to(dtype).eval()
    n_checked = 0
    for seed in range(12):
        b = 1 if seed % 2 == 0 else 3
        x = _prefix(100 + seed, b, p=5 + seed % 3).to(dtype)
        mask = None
        if b > 1 and seed % 4 == 1:  # left-padded batch
            mask = torch.ones(b, x.shape[1], dtype=torch.long)
            mask[0, :2] = 0
            x[0, :2] = 0
        greedy = main.decode_greedy(x, mask)
        g = torch.Generator().manual_seed(seed)
        partial = greedy[:, :3].clone()
        flip = torch.rand(partial.shape, generator=g) < 0.01  # ~1 % of codes wrong: some layers pass, some fail
        partial[flip] = shift_codes(partial[flip])
        for draft in (random_draft, FixedDraft(tokens=partial), FixedDraft(tokens=shift_codes(greedy[:, :3]))):
            tokens, stats = SpeculativeDecoder(main, draft, RSDConfig(mode="exact")).generate(x, mask)
            assert torch.equal(tokens, greedy), f"seed {seed}"
            assert 5 <= stats.main_passes <= 7
            n_checked += 1
    assert n_checked == 36


def test_relaxed_r0_tau1_equals_exact(sharp_main):
    x = _prefix(4, 4)
    greedy = sharp_main.decode_greedy(x)
    g = torch.Generator().manual_seed(0)
    draft = greedy[:, :3].clone()
    flip = torch.rand(draft.shape, generator=g) < 0.005
    draft[flip] = shift_codes(draft[flip])
    out = {}
    for mode in ("exact", "relaxed"):
        cfg = RSDConfig(mode=mode, relaxed_r=0, relaxed_tau=1.0)
        out[mode] = SpeculativeDecoder(sharp_main, FixedDraft(tokens=draft), cfg).generate(x)
    assert torch.equal(out["exact"][0], out["relaxed"][0])
    assert torch.equal(out["exact"][1].accepted, out["relaxed"][1].accepted)
    assert torch.equal(out["exact"][0], greedy)


def test_relaxed_accepts_within_distance(sharp_main):
    x = _prefix(5, 2)
    greedy = sharp_main.decode_greedy(x)
    # every code one level away from main's argmax *given the draft's own previous layers*
    seq = greedy.clone()
    for j in range(3):
        _, logits = sharp_main(x, seq)
        target = logits[:, j].argmax(-1)
        seq[:, j] = torch.where(target < 6, target + 1, target - 1)
    near = seq[:, :3]
    tokens, stats = SpeculativeDecoder(
        sharp_main, FixedDraft(tokens=near), RSDConfig(mode="relaxed", relaxed_r=1, relaxed_tau=1.0)
    ).generate(x)
    assert stats.per_layer_acceptance == [1.0, 1.0, 1.0]
    assert torch.equal(tokens[:, :3], near)  # lossy: the draft's layers are kept
    assert stats.main_passes == 5
    # r = 0 rejects them all and repairs with main's argmax
    tokens0, stats0 = SpeculativeDecoder(
        sharp_main, FixedDraft(tokens=near), RSDConfig(mode="relaxed", relaxed_r=0, relaxed_tau=1.0)
    ).generate(x)
    assert torch.equal(tokens0, greedy)
    assert stats0.main_passes == 7


def test_relaxed_tau_fraction():
    logits = torch.zeros(1, 10, 7)
    logits[..., 3] = 5.0  # argmax 3 everywhere
    draft = torch.full((1, 10), 3)
    draft[0, :2] = 6  # 2 of 10 codes far away
    assert accept_relaxed(draft, logits, r=1, tau=0.8).accepted.item()
    assert not accept_relaxed(draft, logits, r=1, tau=0.81).accepted.item()
    assert not accept_relaxed(draft, logits, r=1, tau=1.0).accepted.item()
    dec = accept_relaxed(draft, logits, r=1, tau=0.9)
    assert torch.equal(dec.tokens, torch.full((1, 10), 3))  # rejected -> main's argmax


def test_cache_truncation_matches_recompute(main):
    """Verify 3 layers, crop to 1 after a rejection, feed the repaired layer: same logits as from scratch."""
    x = _prefix(6, 2)
    g = torch.Generator().manual_seed(1)
    lay = torch.randint(0, 7, (2, 8, 128), generator=g)
    pre = main.prefill(x)
    main.step(lay[:, :3], pre.cache)
    assert pre.cache.num_fed == 3
    pre.cache.crop(1)
    assert pre.cache.num_fed == 1
    repaired = torch.randint(0, 7, (2, 1, 128), generator=g)
    after = main.step(repaired, pre.cache)
    # from scratch
    fresh = main.prefill(x)
    ref = main.step(torch.cat([lay[:, :1], repaired], dim=1), fresh.cache)
    torch.testing.assert_close(after[:, 0], ref[:, 1], rtol=1e-5, atol=1e-5)
    # and the teacher-forced training forward agrees too
    seq = torch.cat([lay[:, :1], repaired, lay[:, 2:]], dim=1)
    _, tf_logits = main(x, seq)
    torch.testing.assert_close(after[:, 0], tf_logits[:, 2], rtol=1e-5, atol=1e-5)


def test_multi_token_step_equals_single_steps(main):
    x = _prefix(7, 2)
    lay = torch.randint(0, 7, (2, 3, 128), generator=torch.Generator().manual_seed(2))
    a = main.prefill(x)
    multi = main.step(lay, a.cache)
    b = main.prefill(x)
    singles = torch.cat([main.step(lay[:, i : i + 1], b.cache) for i in range(3)], dim=1)
    torch.testing.assert_close(multi, singles, rtol=1e-5, atol=1e-5)


def test_disabled_is_main_only(main):
    x = _prefix(8, 2)
    tokens, stats = SpeculativeDecoder(main, None, RSDConfig(mode="exact", enabled=False)).generate(x)
    assert torch.equal(tokens, main.decode_greedy(x))
    assert stats.main_passes == 7


def test_decode_actions_uses_tokenizer(main):
    class StubTokenizer:
        def decode(self, tokens, layers=None):
            assert tokens.shape == (2, 8, 16, 8)  # [B, H, D, L]
            return tokens.float().mean(dim=(2, 3))[..., None].expand(-1, -1, 7)

    x = _prefix(9, 2)
    eng = SpeculativeDecoder(main, None, RSDConfig(enabled=False, action_decode="greedy"), tokenizer=StubTokenizer())
    tokens, _ = eng.generate(x)
    acts = eng.decode_actions(tokens)
    assert acts.shape == (2, 8, 7)


def test_stats_to_dict_is_json(main):
    import json

    x = _prefix(10, 2)
    _, stats = SpeculativeDecoder(main, FixedDraft(tokens=main.decode_greedy(x)[:, :3])).generate(x)
    d = json.loads(json.dumps(stats.to_dict()))
    assert set(d["timings_ms"]) == {"prefill", "draft", "verify", "decode", "total"}
    assert d["main_passes_incl_prefill"] == 6


def test_too_many_draft_layers_rejected():
    main = tiny_main(seed=0, num_layers=3, codes=4)
    with pytest.raises(ValueError, match="draft_layers"):
        SpeculativeDecoder(main, None, RSDConfig(draft_layers=3))


@pytest.mark.parametrize("k, passes", [(1, 7), (2, 6), (3, 5), (5, 3)])
def test_draft_length_pass_counting(main, k, passes):
    """With an oracle draft of k layers: 1 verification pass + (L - 1 - k) decoding steps."""
    x = _prefix(11, 2)
    greedy = main.decode_greedy(x)
    eng = SpeculativeDecoder(main, FixedDraft(tokens=greedy[:, :k]), RSDConfig(mode="exact", draft_layers=k))
    tokens, stats = eng.generate(x)
    assert torch.equal(tokens, greedy)
    assert stats.main_passes == passes


class Layer0Draft(torch.nn.Module):
    """Oracle-style draft proposing layers 1..k given layer 0 (the layer-0-conditioned variant, docs/rsd.md)."""

    first_layer = 1

    def __init__(self, tokens: torch.Tensor, expect_layer0: torch.Tensor) -> None:
        super().__init__()
        self.inner = FixedDraft(tokens=tokens)
        self.expect_layer0 = expect_layer0

    def forward(self, hidden, layer0=None):
        assert layer0 is not None and torch.equal(layer0, self.expect_layer0)
        return self.inner(hidden)


def test_layer0_conditioned_draft_saves_a_pass(main):
    x = _prefix(12, 3)
    greedy = main.decode_greedy(x)
    draft = greedy[:, 1:4].clone()
    draft[2, 1] = shift_codes(draft[2, 1])  # sample 2: layer 2 wrong
    eng = SpeculativeDecoder(main, Layer0Draft(draft, greedy[:, 0]), RSDConfig(mode="exact"))
    tokens, stats = eng.generate(x)
    assert torch.equal(tokens, greedy)
    assert stats.first_layer == 1
    assert stats.accepted.tolist() == [[True, True, True], [True, True, True], [True, False, False]]
    # all accepted: 1 verification over [L0, d1, d2, d3] + layers 5..7 (3 steps) = 4 passes
    assert stats.main_passes_per_sample == [4, 4, 6]


def test_layer0_conditioned_rsd_draft_model_runs(main):
    d = RFSQDraftModel(input_dim=32, hidden_dim=64, feedforward_dim=128, num_heads=4, condition_on_layer0=True)
    x = _prefix(13, 2)
    tokens, stats = SpeculativeDecoder(main, d.eval(), RSDConfig(mode="exact")).generate(x)
    assert torch.equal(tokens, main.decode_greedy(x))
    with pytest.raises(ValueError, match="layer0"):
        d(torch.randn(2, 32))
