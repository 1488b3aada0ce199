"""Pure tensor functions of the DuQuant recipe: channel energy, zigzag permutation, block rotations, fake quant.

Conventions (used by :class:`quant.linear.DuQuantLinear` and its tests). For ``y = x W^T`` with ``W`` of shape
``[out, in]``:

* inputs are zero-padded to a multiple of ``block`` (``in_pad``) and outputs to a multiple of ``block_out``
  (``out_pad``); padded weight rows/columns are zero, so padding never changes the function;
* ``perm`` (length ``in_pad``) reorders input channels: ``x' = x[..., perm]``, ``W' = W[:, perm]``;
* ``r_in`` is ``[nb, block, block]``, block-diagonal ``R_in``: ``x_t = x' R_in`` and ``W_in = W' R_in``, so
  ``x_t W_in^T = x' R_in R_in^T W'^T = x W^T``;
* ``r_out`` is ``[nbo, block_out, block_out]``, block-diagonal ``R_out`` on the output: ``y_t = y R_out`` and
  ``W_t = R_out^T W_in``; ``restore`` computes ``y = y_t R_out^T``.

All transforms are computed in float32 whatever the model dtype: they are orthogonal only up to the precision they
are built in, and a bf16 rotation would add error that is not quantisation error.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

#: Clipping ratios tried per output row (1.0 = plain max scaling). Small on purpose: the recipe's "small search".
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7)


def padded(n: int, block: int) -> int:
    """``n`` rounded up to a multiple of ``block``."""
    return int(math.ceil(n / block) * block)


def channel_energy(weight: torch.Tensor, ls: float) -> torch.Tensor:
    """Per input channel energy ``e_j = mean_i W[i, j]^2`` smoothed as ``e <- (1-LS) e + LS mean(e)``.

    The smoothing is affine and increasing, so it never changes the *order* of channels; with zigzag dealing (which
    uses only the order) LS therefore cannot change the permutation. It is kept because the recipe exposes it, it is
    part of the pack key, and it matters for any value-based dealing.
    """
    e = weight.detach().float().pow(2).mean(dim=0)
    return (1.0 - ls) * e + ls * e.mean()


def zigzag_permutation(energy: torch.Tensor, block: int) -> torch.Tensor:
    """Deal channels, highest energy first, over the blocks in zigzag order (0,1,..,nb-1,nb-1,..,0,0,1,..).

    Why zigzag rather than round-robin: round-robin always gives block 0 the largest channel of every round, so it
    accumulates the most energy; zigzag alternates direction so per-block energy sums stay balanced, and each block's
    rotation then has at most ~one outlier to spread. ``len(energy)`` must be a multiple of ``block``.
    """
    n = energy.numel()
    if n % block:
        raise ValueError(f"zigzag_permutation: {n} channels is not a multiple of block {block}")
    nb = n // block
    order = torch.argsort(energy, descending=True, stable=True)
    i = torch.arange(n)
    rnd, pos = i // nb, i % nb
    blk = torch.where(rnd % 2 == 0, pos, nb - 1 - pos)
    # channel order[i] goes to block blk[i], slot rnd[i]
    perm = torch.empty(n, dtype=torch.long)
    perm[blk * block + rnd] = order
    return perm


def hadamard(n: int) -> torch.Tensor:
    """The ``n x n`` Sylvester Hadamard matrix over ``sqrt(n)`` (symmetric and orthogonal; ``n`` a power of 2)."""
    return _hadamard(n)


def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def data_free_rotations(nblocks: int, block: int, seed: int) -> torch.Tensor:
    """Randomised Hadamard rotations (``H diag(+-1)``; random orthogonal when ``block`` is not a power of 2).

    A Hadamard rotation spreads any single outlier channel evenly over the block (every entry has magnitude
    ``1/sqrt(block)``), which is what the quantiser needs, and it needs no data.
    """
    g = torch.Generator().manual_seed(seed)
    if block & (block - 1) == 0:
        h = _hadamard(block)
        signs = torch.randint(0, 2, (nblocks, block), generator=g).float() * 2 - 1
        return signs.unsqueeze(-1) * h.unsqueeze(0)  # diag(s) H: orthogonal
    q, r = torch.linalg.qr(torch.randn(nblocks, block, block, generator=g))
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


def svd_rotations(blocks: torch.Tensor) -> torch.Tensor:
    """Right singular vectors of each block ``[nb, rows, block]`` via the ``block x block`` Gram matrix (cheap).

    ``eigh`` of ``B^T B`` gives the same basis as the SVD's ``V`` without the ``rows x rows`` factor. Signs are
    fixed (largest entry of each column positive) so the result is deterministic across runs and devices.
    """
    gram = blocks.transpose(-1, -2) @ blocks
    _, vecs = torch.linalg.eigh(gram.double())
    vecs = vecs.flip(-1)  # descending eigenvalues
    idx = vecs.abs().argmax(dim=-2, keepdim=True)
    sign = torch.sign(torch.gather(vecs, -2, idx))
    sign[sign == 0] = 1
    return (vecs * sign).float()


def build_input_transform(
    weight: torch.Tensor, block: int, permute: bool, rot: str, ls: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(perm, r_in)`` for a weight ``[out, in]``: zigzag permutation + per-block rotation."""
    w = weight.detach().float()
    out_f, in_f = w.shape
    in_pad = padded(in_f, block)
    wp = torch.nn.functional.pad(w, (0, in_pad - in_f))
    perm = zigzag_permutation(channel_energy(wp, ls), block) if permute else torch.arange(in_pad)
    nb = in_pad // block
    if rot == "svd":
        r_in = svd_rotations(wp[:, perm].reshape(out_f, nb, block).transpose(0, 1))
    elif rot == "hadamard":
        r_in = data_free_rotations(nb, block, seed)
    elif rot == "none":
        r_in = torch.eye(block).expand(nb, block, block).clone()
    else:
        raise ValueError(f"unknown rotation mode {rot!r}")
    return perm, r_in


def build_output_transform(w_in: torch.Tensor, block_out: int, rot: str, seed: int = 1) -> torch.Tensor:
    """``r_out`` ``[nbo, block_out, block_out]`` for an input-transformed weight ``[out_pad, in_pad]``."""
    out_pad = w_in.shape[0]
    nbo = out_pad // block_out
    if rot == "svd":
        # Row blocks: left singular vectors of each [block_out, in] slab, i.e. the right ones of its transpose.
        return svd_rotations(w_in.reshape(nbo, block_out, -1).transpose(-1, -2))
    if rot == "hadamard":
        return data_free_rotations(nbo, block_out, seed)
    return torch.eye(block_out).expand(nbo, block_out, block_out).clone()


def rotate_last(x: torch.Tensor, r: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """``x[..., n*B] -> x`` block-wise times ``r[n]`` (or ``r[n]^T``) along the last dimension."""
    nb, b, _ = r.shape
    lead = x.shape[:-1]
    xb = x.reshape(-1, nb, b).transpose(0, 1)  # [nb, N, b]
    yb = torch.bmm(xb, r.transpose(-1, -2) if transpose else r)
    return yb.transpose(0, 1).reshape(*lead, nb * b)


def transform_weight(
    weight: torch.Tensor, perm: torch.Tensor, r_in: torch.Tensor, r_out: torch.Tensor | None, block_out: int
) -> torch.Tensor:
    """``W_t = R_out^T W[:, perm] R_in`` (float32, padded to ``[out_pad, in_pad]``; ``out`` unpadded w/o R_out)."""
    w = weight.detach().float()
    out_f, in_f = w.shape
    in_pad = perm.numel()
    w = torch.nn.functional.pad(w, (0, in_pad - in_f))[:, perm]
    w = rotate_last(w, r_in)  # rows of W times R_in == W' R_in
    if r_out is None:
        return w
    out_pad = padded(out_f, block_out)
    w = torch.nn.functional.pad(w, (0, 0, 0, out_pad - out_f))
    # R_out^T W_in: transpose so the output dim is last, rotate by R_out (x R_out == (R_out^T x^T)^T), transpose back.
    return rotate_last(w.t(), r_out).t().contiguous()


def qmax_for(bits: int) -> int:
    """Largest symmetric integer level for ``bits`` (e.g. 7 for 4 bits, 127 for 8)."""
    return 2 ** (bits - 1) - 1


def expand_scales(scale: torch.Tensor, n: int, group: int = 0) -> torch.Tensor:
    """Weight scales broadcastable against an ``[out, n]`` weight: per-row ``[out]`` -> ``[out, 1]``; per-group
    ``[out, ceil(n / group)]`` -> ``[out, n]`` (column j uses its group ``j // group``)."""
    if scale.dim() == 1:
        return scale.unsqueeze(1)
    if scale.shape[1] == 1:
        return scale
    return scale.repeat_interleave(group, dim=1)[:, :n]


def weight_row_scales(
    w: torch.Tensor, bits: int, clip_search: bool, importance: torch.Tensor | None = None, group: int = 0,
) -> torch.Tensor:
    """Per output row symmetric scale; with ``clip_search`` the ratio in :data:`CLIP_RATIOS` with least row error.

    Clipping the largest few weights of a row lets the 15 levels of INT4 resolve the bulk of the row; the best
    ratio differs per row, so it is chosen per row (a few quantise-dequantise passes, done once per layer).
    ``importance`` (per input channel, e.g. ``E[x_j^2]`` from calibration) weights the error so the search
    minimises the expected *output* error ``sum_j E[x_j^2] (w_ij - q_ij)^2`` rather than the weight error.

    ``group`` > 0 (and below the row length): one scale per ``group`` consecutive input columns of each row,
    shape ``[out, ceil(in / group)]`` (GPTQ/AWQ/torchao's int4 group size; the last group may be short), each
    searched as a row of its own. Why: at W4 one scale per row lets the row's largest weights set the step for
    all of its columns; per group only its own columns do.
    """
    w = w.float()
    if 0 < group < w.shape[1]:
        out, n = w.shape
        ng = -(-n // group)
        wg = F.pad(w, (0, ng * group - n)).reshape(out * ng, group)
        imp = None
        if importance is not None:
            imp = F.pad(importance.float().to(w.device), (0, ng * group - n)).reshape(1, ng, group)
            imp = imp.expand(out, ng, group).reshape(out * ng, group)
        return weight_row_scales(wg, bits, clip_search, imp).reshape(out, ng)
    qmax = qmax_for(bits)
    amax = w.abs().amax(dim=1).clamp_min(1e-8)
    if not clip_search:
        return amax / qmax
    imp = None if importance is None else importance.float().to(w.device)
    ratios = torch.tensor(CLIP_RATIOS, dtype=w.dtype, device=w.device).view(-1, 1, 1)
    best = torch.empty_like(amax)
    # All ratios at once (few large ops instead of many small ones), in row chunks to bound memory.
    rows = max(1, (1 << 24) // max(1, w.shape[1] * len(CLIP_RATIOS)))
    for r0 in range(0, w.shape[0], rows):
        wc = w[r0 : r0 + rows].unsqueeze(0)
        s = amax[r0 : r0 + rows].view(1, -1, 1) * ratios / qmax  # [R, rows, 1]
        d2 = (fake_quant(wc, s, qmax) - wc).pow_(2)
        if imp is not None:  # per input channel [in], or per row [rows, in] (the grouped path)
            d2.mul_(imp if imp.dim() == 1 else imp[r0 : r0 + rows])
        err = d2.sum(dim=2)  # [R, rows]
        best[r0 : r0 + rows] = s.squeeze(2).gather(0, err.argmin(dim=0, keepdim=True)).squeeze(0)
    return best


def gptq_quantize(
    w: torch.Tensor, scale: torch.Tensor, bits: int, hessian: torch.Tensor, damp: float = 0.01, blocksize: int = 128,
    act_order: bool = False, group: int = 0,
) -> torch.Tensor:
    """GPTQ (Frantar et al. 2022) with fixed per-row scales: quantise columns in order, pushing each column's error
    onto the not-yet-quantised columns through the inverse Hessian ``H = E[x x^T]`` of the layer's inputs.

    Written from the paper's algorithm (Cholesky of ``H^-1``, lazy block updates). Returns the dequantised weight.
    Why: at W4 per-row scaling leaves a weight-error floor that rotations cannot remove; error feedback lowers it
    using the same calibration data the activation scales already need. ``act_order``: columns in decreasing
    ``diag(H)`` order (the most active inputs first, while the most columns are left to absorb their error).
    Memory: the ``in x in`` Hessian (float64 while inverting) plus the weight, for one layer.
    ``scale``: per row ``[out]``, or per group ``[out, ceil(in / group)]`` (fixed beforehand, as in GPTQ's static
    groups, so that act-order can reorder the columns freely).
    """
    w = w.float().clone()
    n = w.shape[1]
    h = hessian.double().to(w.device).clone()
    s_cols = expand_scales(scale.float().to(w.device), n, group)  # [out, 1] or [out, n]
    order = None
    if act_order:
        order = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, order], h[order][:, order]
        if s_cols.shape[1] > 1:
            s_cols = s_cols[:, order]
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.mean(torch.diag(h)) * torch.eye(n, dtype=h.dtype, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()
    qmax = qmax_for(bits)
    per_col = s_cols.shape[1] > 1
    s = s_cols[:, 0]
    q = torch.zeros_like(w)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hb = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            qc = fake_quant(col, s_cols[:, i1 + i] if per_col else s, qmax)
            q[:, i1 + i] = qc
            e = (col - qc) / hb[i, i]
            w1[:, i:] -= e.unsqueeze(1) * hb[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if order is not None:
        q = q[:, torch.argsort(order)]
    return q


def quant_codes(x: torch.Tensor, scale: torch.Tensor | float, qmax: int) -> torch.Tensor:
    """The integer levels :func:`fake_quant` rounds to, ``clamp(round(x / s), -qmax, qmax)``, as int8."""
    return torch.clamp(torch.round(x / scale), -qmax, qmax).to(torch.int8)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit codes ``[..., n]`` (values in [-8, 7]) -> uint8 ``[..., ceil(n/2)]``, two codes per byte.

    Layout: each code is stored offset by 8 (a nibble 0..15); column ``2j`` is the low nibble of byte ``j`` and
    column ``2j+1`` its high nibble. An odd ``n`` is padded with the code 0 (nibble 8), which :func:`unpack_int4`
    drops again given ``n``.
    """
    u = codes.to(torch.int16) + 8
    if u.numel() and (int(u.min()) < 0 or int(u.max()) > 15):
        raise ValueError("pack_int4: codes must lie in [-8, 7]")
    if u.shape[-1] % 2:
        u = torch.nn.functional.pad(u, (0, 1), value=8)
    return (u[..., 0::2] | (u[..., 1::2] << 4)).to(torch.uint8)


def unpack_int4(packed: torch.Tensor, n: int, dtype: torch.dtype = torch.int8) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``[..., m]`` -> codes ``[..., n]`` (``n <= 2m``) as ``dtype``."""
    both = torch.stack((packed & 15, packed >> 4), dim=-1).reshape(*packed.shape[:-1], -1)[..., :n]
    return both.to(dtype) - 8


def fake_quant(x: torch.Tensor, scale: torch.Tensor | float, qmax: int) -> torch.Tensor:
    """Symmetric quantise-dequantise: ``clamp(round(x / s), -qmax, qmax) * s``."""
    return torch.clamp(torch.round(x / scale), -qmax, qmax) * scale


def is_orthogonal(r: torch.Tensor, atol: float = 1e-5) -> bool:
    """Whether every ``r[n]`` satisfies ``r r^T = I`` (test helper, also used for pack validation)."""
    eye = torch.eye(r.shape[-1], dtype=r.dtype)
    return bool(torch.allclose(r @ r.transpose(-1, -2), eye.expand_as(r), atol=atol))
