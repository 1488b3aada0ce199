"""Permutation and rotations: orthogonal, invertible, and exact in full precision."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from quant import DuQuantLinear
from quant import transforms as T


def test_zigzag_is_a_balanced_permutation() -> None:
    g = torch.Generator().manual_seed(0)
    e = torch.rand(64, generator=g)
    e[[3, 9, 17, 40]] = torch.tensor([100.0, 90.0, 80.0, 70.0])
    perm = T.zigzag_permutation(e, 16)
    assert sorted(perm.tolist()) == list(range(64))
    blocks = perm.view(4, 16)
    # the four outliers land in four different blocks
    assert {int(b) for b in range(4) for c in blocks[b].tolist() if c in (3, 9, 17, 40)} == {0, 1, 2, 3}
    sums = e[blocks].sum(dim=1)
    assert float(sums.max() - sums.min()) < 40.0  # round-robin would give block 0 all of the biggest of each round


def test_ls_smoothing_keeps_channel_order() -> None:
    w = torch.randn(8, 32)
    assert torch.equal(torch.argsort(T.channel_energy(w, 0.0)), torch.argsort(T.channel_energy(w, 0.9)))


@pytest.mark.parametrize("block", [16, 12, 1])
def test_rotations_are_orthogonal_and_invertible(block: int) -> None:
    w = torch.randn(40, 3 * block)
    for mode in ("svd", "hadamard", "none"):
        perm, r_in = T.build_input_transform(w, block, True, mode, 0.15, seed=3)
        assert T.is_orthogonal(r_in)
        x = torch.randn(5, 3 * block)
        back = T.rotate_last(T.rotate_last(x, r_in), r_in, transpose=True)
        assert torch.allclose(back, x, atol=1e-5)
        inv = torch.argsort(perm)
        assert torch.equal(x[:, perm][:, inv], x)
    assert T.is_orthogonal(T.build_output_transform(w, 8, "svd")) and T.is_orthogonal(T.data_free_rotations(3, 8, 0))


def test_transformed_weight_reproduces_the_product() -> None:
    w, x = torch.randn(24, 40), torch.randn(7, 40)
    perm, r_in = T.build_input_transform(w, 16, True, "svd", 0.15)
    w_in = torch.nn.functional.pad(T.transform_weight(w, perm, r_in, None, 8), (0, 0, 0, 0))
    r_out = T.build_output_transform(w_in, 8, "svd")
    w_t = T.transform_weight(w, perm, r_in, r_out, 8)
    x_t = T.rotate_last(torch.nn.functional.pad(x, (0, 8))[:, perm], r_in)
    y = T.rotate_last(x_t @ w_t.t(), r_out, transpose=True)
    assert torch.allclose(y, x @ w.t(), atol=1e-4)


@settings(max_examples=25, deadline=None)
@given(
    d_in=st.integers(1, 70), d_out=st.integers(1, 40), block=st.sampled_from([1, 4, 16, 7]),
    block_out=st.sampled_from([1, 8, 16, 5]), row_rot=st.sampled_from(["restore", "0"]),
    rot=st.sampled_from(["svd", "hadamard", "none"]), permute=st.booleans(), bias=st.booleans(),
)
def test_quantisation_off_equals_linear(d_in: int, d_out: int, block: int, block_out: int, row_rot: str, rot: str,
                                        permute: bool, bias: bool) -> None:
    torch.manual_seed(d_in * 100 + d_out)
    lin = nn.Linear(d_in, d_out, bias=bias)
    q = DuQuantLinear(lin, "l", wbits=16, abits=0, block=block, block_out=block_out, row_rot=row_rot, rot=rot,
                      permute=permute)
    x = torch.randn(3, 2, d_in)
    with torch.no_grad():
        assert torch.allclose(q(x), lin(x), atol=1e-5, rtol=1e-5)
