"""The ``expected`` action decode: main's per-layer code distributions, recorded by the engine at no extra pass,
turned into a chunk through the expected RFSQ latent."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from rsd_helpers import TableDraft, random_prefix, shift_codes, tiny_main, tiny_tokenizer

from rsd.config import RSDConfig, RSDConfigError
from rsd.engine import SpeculativeDecoder

torch.set_num_threads(1)
L = 8


@pytest.fixture(scope="module")
def main():
    return tiny_main(seed=0, hidden=32, sharpen=4.0)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def _teacher_forced(main, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Main's logits for every layer given the decided layers before it, from one full forward."""
    with torch.no_grad():
        return main(x, tokens)[1].float()


def _tables(greedy: torch.Tensor) -> dict[str, torch.Tensor]:
    ragged = greedy.clone()
    ragged[0, 2] = shift_codes(ragged[0, 2])
    ragged[1, 5] = shift_codes(ragged[1, 5])
    ragged[2] = shift_codes(ragged[2])
    return {"oracle": greedy, "adversarial": shift_codes(greedy), "ragged": ragged}


@pytest.mark.parametrize("table", ["oracle", "adversarial", "ragged"])
@pytest.mark.parametrize("jacobi", [True, False])
@pytest.mark.parametrize("max_rounds", [0, 1])
def test_recorded_logits_are_mains_on_the_decidedrandom_prefix(main, table, jacobi, max_rounds):
    x = random_prefix(1, 4)
    greedy = main.decode_greedy(x)
    eng = SpeculativeDecoder(main, TableDraft(_tables(greedy)[table]),
                             RSDConfig(mode="exact", adaptive=False, jacobi=jacobi, max_rounds=max_rounds))
    tokens, stats = eng.generate(x)
    assert torch.equal(tokens, greedy)
    assert stats.main_logits is not None and stats.main_logits.shape == (4, L, 128, 7)
    torch.testing.assert_close(stats.main_logits, _teacher_forced(main, x, tokens), atol=1e-4, rtol=1e-4)


def test_main_only_records_the_same_logits_as_exact_rsd(main):
    x = random_prefix(2, 3)
    greedy = main.decode_greedy(x)
    only = SpeculativeDecoder(main, None, RSDConfig(enabled=False))
    rsd = SpeculativeDecoder(main, TableDraft(_tables(greedy)["ragged"]), RSDConfig(mode="exact", adaptive=False))
    (t1, s1), (t2, s2) = only.generate(x), rsd.generate(x)
    assert torch.equal(t1, t2)
    torch.testing.assert_close(s1.main_logits, s2.main_logits, atol=1e-4, rtol=1e-4)


def test_relaxed_mode_records_mains_logits_on_the_accepted_drafts(main):
    """Lossy acceptance keeps drafted codes that are not main's argmax; the distributions are still main's,
    given the codes actually decided."""
    x = random_prefix(3, 2)
    noisy = shift_codes(main.decode_greedy(x))
    eng = SpeculativeDecoder(main, TableDraft(noisy), RSDConfig(mode="relaxed", relaxed_r=1, relaxed_tau=0.5,
                                                                 adaptive=False))
    tokens, stats = eng.generate(x)
    torch.testing.assert_close(stats.main_logits, _teacher_forced(main, x, tokens), atol=1e-4, rtol=1e-4)


def test_one_hot_distributions_decode_to_the_greedy_chunk(tokenizer):
    gen = torch.Generator().manual_seed(0)
    layers = torch.randint(0, 7, (3, L, 128), generator=gen)
    one_hot = F.one_hot(layers, 7).float()
    for depth in (None, 3):
        greedy = tokenizer.decode(tokenizer.layers_to_tokens(layers), depth)
        torch.testing.assert_close(tokenizer.decode_expected(one_hot, depth), greedy, atol=1e-5, rtol=1e-5)


def test_expected_latent_is_the_probability_weighted_mix(tokenizer):
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(0, 7, (2, L, 128), generator=gen)
    b = torch.randint(0, 7, (2, L, 128), generator=gen)
    w = 0.3
    mix = w * F.one_hot(a, 7).float() + (1 - w) * F.one_hot(b, 7).float()
    ae = tokenizer.model
    to_tok = tokenizer.layers_to_tokens
    want = w * ae.tokens_to_latent(to_tok(a)) + (1 - w) * ae.tokens_to_latent(to_tok(b))
    probs = mix.reshape(2, L, 8, 16, 7).permute(0, 2, 3, 1, 4)
    torch.testing.assert_close(ae.probs_to_latent(probs), want, atol=1e-5, rtol=1e-5)
    # a distribution centred between two levels lands between their decodes, not on either
    lo, hi = torch.full((1, L, 128), 2), torch.full((1, L, 128), 4)
    mid = 0.5 * (F.one_hot(lo, 7) + F.one_hot(hi, 7)).float()
    z_mid = ae.probs_to_latent(mid.reshape(1, L, 8, 16, 7).permute(0, 2, 3, 1, 4))
    z3 = ae.tokens_to_latent(to_tok(torch.full((1, L, 128), 3)))
    torch.testing.assert_close(z_mid, z3, atol=1e-5, rtol=1e-5)  # uniform grid: the middle level


def test_bad_distributions_are_refused(tokenizer):
    with pytest.raises(ValueError, match="layer_probs must be"):
        tokenizer.decode_expected(torch.ones(2, L, 100, 7) / 7)
    with pytest.raises(ValueError, match="layer_probs must be"):
        tokenizer.decode_expected(torch.ones(2, L, 128, 5) / 5)
    with pytest.raises(ValueError, match="probs must be"):
        tokenizer.model.probs_to_latent(torch.ones(1, 8, 16, L, 7) / 7, layers=9)


def test_action_decode_setting_is_checked_at_start_up():
    assert RSDConfig().action_decode == "expected"
    assert RSDConfig.from_env_and_args(env={"RSD_ACTION_DECODE": "Greedy"}).action_decode == "greedy"
    with pytest.raises(RSDConfigError, match="RSD_ACTION_DECODE"):
        RSDConfig.from_env_and_args(env={"RSD_ACTION_DECODE": "mean"})
    with pytest.raises(RSDConfigError, match="--rsd-action-decode"):
        RSDConfig.from_env_and_args({"rsd_action_decode": "mode"}, env={})


def test_engine_decodes_the_configured_way(main, tokenizer):
    x = random_prefix(4, 2)
    greedy_eng = SpeculativeDecoder(main, None, RSDConfig(enabled=False, action_decode="greedy"), tokenizer=tokenizer)
    exp_eng = SpeculativeDecoder(main, None, RSDConfig(enabled=False), tokenizer=tokenizer)  # the default
    tokens, stats = exp_eng.generate(x)
    expected = exp_eng.decode_actions(tokens, main_logits=stats.main_logits)
    torch.testing.assert_close(expected, tokenizer.decode_expected(stats.main_logits.softmax(-1)))
    greedy = greedy_eng.decode_actions(tokens, main_logits=stats.main_logits)  # greedy ignores the logits
    torch.testing.assert_close(greedy, tokenizer.decode(tokenizer.layers_to_tokens(tokens)))
    assert not torch.allclose(expected, greedy)
    with pytest.raises(ValueError, match="main_logits"):
        exp_eng.decode_actions(tokens)
