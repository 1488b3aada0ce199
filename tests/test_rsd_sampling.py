"""Sampling mode is an exact sample of the main model's distribution (statistical tests).

False-failure rate: each test below runs a family of chi-square tests with a Bonferroni-corrected level so the
whole family rejects a *correct* implementation with probability <= ALPHA = 1e-3; the seeds are fixed, so the
outcome is deterministic for a given torch build (a failure after a change means the distribution changed,
or, with probability <= 1e-3 over seeds, bad luck). The power checks show the same tests catch a plausible bug
(taking the draft's samples without correction).
"""

from __future__ import annotations

import pytest
import torch
from rsd_helpers import FixedDraft, chi2_goodness, chi2_two_sample, tiny_main

from rsd.acceptance import accept_sampling, draft_propose
from rsd.config import RSDConfig
from rsd.engine import SpeculativeDecoder

torch.set_num_threads(1)
ALPHA = 1e-3
N = 6000
BATCH = 500


def test_accept_sampling_single_code_is_exact():
    """One code, known p and q: the output follows p and the acceptance rate is sum(min(p, q))."""
    g = torch.Generator().manual_seed(0)
    p_logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, 1.5, -2.0])
    q_logits = torch.tensor([0.0, 2.0, 1.0, -1.0, -0.5, 1.0, 0.0])
    n = 200_000
    d, q = draft_propose(q_logits.expand(n, 1, 7), "sampling", 1.0, g)
    dec = accept_sampling(d, q, p_logits.expand(n, 1, 7), 1.0, g)
    p = torch.softmax(p_logits, -1)
    _, _, pval = chi2_goodness(dec.tokens, p)
    assert pval > ALPHA
    expected_rate = torch.minimum(p, torch.softmax(q_logits, -1)).sum().item()
    assert abs(dec.accepted.float().mean().item() - expected_rate) < 0.005  # ~5 standard errors
    # power: the draft's own samples are not p-distributed
    assert chi2_goodness(d, p)[2] < 1e-6


def test_accept_sampling_temperature():
    g = torch.Generator().manual_seed(1)
    p_logits = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5, 1.5, -2.0])
    n = 100_000
    d, q = draft_propose(torch.zeros(n, 1, 7), "sampling", 0.5, g)
    dec = accept_sampling(d, q, p_logits.expand(n, 1, 7), 0.5, g)
    assert chi2_goodness(dec.tokens, torch.softmax(p_logits / 0.5, -1))[2] > ALPHA


@pytest.fixture(scope="module")
def setup():
    """4-layer, 4-code model with peaked, layer-dependent distributions and a controlled imperfect draft.

    The draft is main's teacher-forced logits along the greedy path, damped and noised: layer 0 is accepted
    ~70 % of the time, d_1 ~18 % given reached, d_2 ~15 % given reached, so accept, repair (residual
    resampling) and the bonus layer all occur in the samples.
    """
    main = tiny_main(seed=5, num_layers=4, codes=4, sharpen=15.0)
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(0))
    greedy = main.decode_greedy(x)
    with torch.no_grad():
        _, tf = main(x, greedy)
    noise = torch.randn(tf[:, :3].shape, generator=torch.Generator().manual_seed(1))
    draft = FixedDraft(logits=tf[:, :3] * 0.8 + 0.5 * noise)
    eng = SpeculativeDecoder(main, draft, RSDConfig(mode="sampling", seed=123))
    rsd, accepted = [], []
    for _ in range(N // BATCH):
        tokens, stats = eng.generate(x.expand(BATCH, -1, -1))
        rsd.append(tokens)
        accepted.append(stats.accepted)
    g = torch.Generator().manual_seed(456)
    ref = torch.cat([main.decode_sample(x.expand(BATCH, -1, -1), generator=g) for _ in range(N // BATCH)])
    pre = main.prefill(x)
    return {
        "rsd": torch.cat(rsd),
        "ref": ref,
        "accepted": torch.cat(accepted),
        "p0": torch.softmax(pre.logits0[0], -1),
        "draft_logits": draft.logits,
    }


def test_sampling_exercises_all_branches(setup):
    rate = setup["accepted"].float().mean(0)
    assert 0.3 < rate[0] < 0.95  # layer 0 accepted and repaired
    assert 0.05 < rate[1] < 0.5  # d_1 accepted and repaired
    assert setup["accepted"][:, 2].sum() >= 30  # all three accepted -> bonus layer sampled from p_3


def test_sampling_marginals_match_main_only(setup):
    """Per-code marginals (4 layers x 4 codes, two-sample) + layer 0 vs the exact p_0 (4 codes)."""
    rsd, ref = setup["rsd"], setup["ref"]
    n_layers, n_codes = rsd.shape[1], rsd.shape[2]
    n_tests = n_layers * n_codes + n_codes
    level = ALPHA / n_tests
    for layer in range(n_layers):
        for code in range(n_codes):
            stat, dof, pval = chi2_two_sample(rsd[:, layer, code], ref[:, layer, code], 7)
            assert pval > level, f"layer {layer} code {code}: chi2={stat:.1f} dof={dof} p={pval:.2e}"
    for code in range(n_codes):
        stat, dof, pval = chi2_goodness(rsd[:, 0, code], setup["p0"][code])
        assert pval > level, f"layer 0 code {code} vs p_0: chi2={stat:.1f} dof={dof} p={pval:.2e}"


@pytest.mark.parametrize(
    "pairs",
    [
        ((0, 0), (1, 0)),  # across the layer-0 / layer-1 boundary (dependence through the fed layer)
        ((1, 1), (2, 2)),
        ((0, 2), (3, 3)),
    ],
)
def test_sampling_joints_match_main_only(setup, pairs):
    """Joint of two codes in different layers (49 cells), each with level ALPHA / 3."""
    (la, ca), (lb, cb) = pairs
    rsd, ref = setup["rsd"], setup["ref"]
    joint_rsd = rsd[:, la, ca] * 7 + rsd[:, lb, cb]
    joint_ref = ref[:, la, ca] * 7 + ref[:, lb, cb]
    stat, dof, pval = chi2_two_sample(joint_rsd, joint_ref, 49)
    assert pval > ALPHA / 3, f"joint {pairs}: chi2={stat:.1f} dof={dof} p={pval:.2e}"


def test_power_uncorrected_draft_is_detected(setup):
    """Taking the draft's samples as is (no min(1, p/q) correction) must fail the same test."""
    g = torch.Generator().manual_seed(7)
    d, _ = draft_propose(setup["draft_logits"].expand(N, -1, -1, -1), "sampling", 1.0, g)
    pvals = [chi2_two_sample(d[:, 1, c], setup["ref"][:, 1, c], 7)[2] for c in range(4)]
    assert min(pvals) < ALPHA / 20


class SoftDeepDraft(torch.nn.Module):
    """A deep draft returning fixed soft logits ``[1, L, C, V]`` for the requested layers, whatever the prefix."""

    deep = True
    first_layer = 1

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("table", logits)

    def forward(self, hidden, prefix, num=None):
        m = prefix.shape[1]
        num = self.table.shape[1] - m if num is None else num
        return self.table[:, m : m + num].expand(hidden.shape[0], -1, -1, -1)


@pytest.mark.parametrize("jacobi", [False, True])
def test_deep_sampling_rounds_are_exact_samples_of_main(jacobi):
    """Multi-round speculative sampling with a deep draft (and Jacobi re-proposals) samples main exactly."""
    main = tiny_main(seed=5, num_layers=4, codes=4, sharpen=15.0)
    x = torch.randn(1, 6, 32, generator=torch.Generator().manual_seed(0))
    greedy = main.decode_greedy(x)
    with torch.no_grad():
        _, tf = main(x, greedy)
    noise = torch.randn(tf.shape, generator=torch.Generator().manual_seed(2))
    draft = SoftDeepDraft(tf * 0.8 + 0.5 * noise)
    eng = SpeculativeDecoder(main, draft, RSDConfig(mode="sampling", seed=321, adaptive=False, jacobi=jacobi))
    out, rounds = [], 0
    for _ in range(N // BATCH):
        tokens, stats = eng.generate(x.expand(BATCH, -1, -1))
        out.append(tokens)
        rounds += stats.rounds
    rsd = torch.cat(out)
    g = torch.Generator().manual_seed(654)
    ref = torch.cat([main.decode_sample(x.expand(BATCH, -1, -1), generator=g) for _ in range(N // BATCH)])
    assert rounds > N // BATCH  # more than one round per chunk happened
    level = ALPHA / (3 * 4 + 1)
    for layer in range(1, 4):
        for code in range(4):
            stat, dof, pval = chi2_two_sample(rsd[:, layer, code], ref[:, layer, code], 7)
            assert pval > level, f"layer {layer} code {code}: chi2={stat:.1f} dof={dof} p={pval:.2e}"
    joint_rsd = rsd[:, 1, 0] * 7 + rsd[:, 3, 3]
    joint_ref = ref[:, 1, 0] * 7 + ref[:, 3, 3]
    stat, dof, pval = chi2_two_sample(joint_rsd, joint_ref, 49)
    assert pval > level, f"joint layer 1 / layer 3: chi2={stat:.1f} dof={dof} p={pval:.2e}"
