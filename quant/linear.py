"""Fake-quantised Linear layers: ``DuQuantLinear`` plus the ``RTNLinear`` and ``SmoothQuantLinear`` baselines.

All three share :class:`FakeQuantLinear`: the wrapped layer's ``weight``/``bias`` parameters are kept under the same
names (so ``state_dict`` keys do not change), derived tensors are non-persistent buffers, and activation scales come
from an :class:`AbsObserver` that samples *every* calibration call. Calibration state machine:

``uncalibrated`` --first forward--> lazy calibration for ``calib_steps`` calls --> ``frozen``
``uncalibrated`` --:func:`quant.calibration.calibrate`--> ``calibrating`` --end of calibrate--> ``frozen``

While not frozen a layer quantises weights only (there is no activation scale yet); it observes its inputs in the
space they will be quantised in.

``packed=True`` (``GR00T_DUQUANT_PACKED=1``): once a layer's quantised weight is final it is stored as integer
codes (W<=4: two int4 codes per byte, :func:`quant.transforms.pack_int4`; W5..8: int8) in the persistent buffer
``w_packed`` next to the per-row fp32 ``w_scale``, and the float ``weight`` parameter is dropped (set to ``None``).
Each call dequantises ``PACKED_BLOCK_ELEMS`` weights at a time (a block of output rows) and multiplies, so the
full float weight of a layer never exists at once. The codes are exactly the levels the fake path rounds to and
the scales are the same fp32 values, so packed and fake outputs differ only by float summation order. Weights are
final at construction, except for layers whose weights are refined when calibration ends (``WOPT=act|gptq``,
SmoothQuant with activation quantisation): those are packed by :meth:`FakeQuantLinear.freeze`.
"""

from __future__ import annotations

import logging
import zlib
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from quant import transforms as T
from quant.profile import PROFILER

LOG = logging.getLogger("quant")

#: Weight refinement: ``clip`` data-free clipping search (the recipe's), ``act`` activation-weighted clipping search,
#: ``gptq`` activation-weighted clipping + GPTQ error feedback (both use the calibration batches); ``auto`` is ``gptq``
#: when :func:`quant.calibrate` runs (a calibration set exists) and ``clip`` when the layer calibrates lazily.
WOPT_MODES = ("auto", "clip", "act", "gptq")

#: Samples kept per layer for the activation percentile (a uniform sample of every value seen, see AbsObserver).
OBSERVER_CAPACITY = 1 << 17

#: Packed layers dequantise at most this many weights per matmul block (16 MiB of float32).
PACKED_BLOCK_ELEMS = 1 << 22

_HADAMARD: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}


_INT4_TABLE: dict[str, torch.Tensor] = {}


def _int4_table(device: torch.device) -> torch.Tensor:
    """``[256, 2]`` float32: the two int4 codes (low nibble first) of every byte of :func:`T.pack_int4`."""
    key = str(device)
    if key not in _INT4_TABLE:
        b = torch.arange(256)
        _INT4_TABLE[key] = (torch.stack((b & 15, b >> 4), dim=-1).float() - 8).to(device)
    return _INT4_TABLE[key]


def _hadamard_on(n: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One shared ``n x n`` Hadamard matrix per (size, device, dtype) for the compact rotations of packed layers."""
    key = (n, str(device), dtype)
    if key not in _HADAMARD:
        _HADAMARD[key] = T.hadamard(n).to(device=device, dtype=dtype)
    return _HADAMARD[key]


class AbsObserver:
    """Uniform sample of ``|x|`` over *all* observed calls (bottom-k reservoir) plus the exact running max.

    Why a reservoir: the published code set its scale from the first calibration batch only; keeping every value of
    32 batches is too much memory for a 7B model (hundreds of layers), so each value gets a random key and the
    ``capacity`` values with the smallest keys are kept. That is an exact uniform sample without replacement of
    everything seen, whatever the number and size of the calls, in bounded memory.
    """

    def __init__(self, capacity: int = OBSERVER_CAPACITY, seed: int = 0) -> None:
        self.capacity = capacity
        self.gen = torch.Generator().manual_seed(seed)
        self.values = torch.empty(0)
        self.keys = torch.empty(0)
        self.max = 0.0
        self.calls = 0
        self.seen = 0
        self._dev_gens: dict[torch.device, torch.Generator] = {}

    def _keys(self, n: int, device: torch.device) -> torch.Tensor:
        if device.type == "cpu":
            return torch.rand(n, generator=self.gen)
        if device not in self._dev_gens:
            self._dev_gens[device] = torch.Generator(device=device).manual_seed(int(self.gen.initial_seed()))
        return torch.rand(n, generator=self._dev_gens[device], device=device)

    def observe(self, x: torch.Tensor) -> None:
        v = x.detach().abs().reshape(-1).float()
        if v.numel() == 0:
            return
        self.calls += 1
        self.seen += v.numel()
        self.max = max(self.max, float(v.max()))
        keys = self._keys(v.numel(), v.device)
        if keys.numel() > self.capacity:
            # bottom-k of the union == bottom-k of (bottom-k of each part): reduce on the device, copy only k values
            keys, idx = torch.topk(keys, self.capacity, largest=False, sorted=False)
            v = v[idx]
        vals = torch.cat([self.values, v.cpu()])
        allk = torch.cat([self.keys, keys.cpu()])
        if allk.numel() > self.capacity:
            allk, idx = torch.topk(allk, self.capacity, largest=False, sorted=False)
            vals = vals[idx]
        self.values, self.keys = vals, allk

    def percentile(self, pct: float) -> float:
        """``pct`` percentile of |x| over everything observed (exact max when ``pct`` is 100)."""
        if self.calls == 0:
            raise RuntimeError("observer saw no data")
        if pct >= 100.0 or self.values.numel() == 1:
            return self.max
        return float(torch.quantile(self.values, pct / 100.0))


class FakeQuantLinear(nn.Module):
    """Base class: a Linear with W-bit weights and A-bit (static, per-tensor) activations in a transformed space."""

    method = "fake"

    def __init__(
        self,
        linear: nn.Linear,
        name: str,
        wbits: int,
        abits: int,
        act_pct: float = 99.9,
        act_gran: str = "tensor",
        calib_steps: int = 32,
        clip_search: bool = True,
        precache: bool = True,
        profile: bool = False,
        packed: bool = False,
        step_scales: bool = False,
        wgroup: int = 0,
    ) -> None:
        super().__init__()
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.weight = linear.weight
        self.bias = linear.bias
        self.name = name
        self.wbits = wbits
        self.abits = abits
        self.act_pct = act_pct
        if act_gran not in ("tensor", "token"):
            raise ValueError(f"act_gran must be tensor|token, got {act_gran!r}")
        # tensor: one static scale from the ACT_PCT percentile (the recipe's); token: dynamic per-token absmax (DuQuant
        # paper), which isolates the few tokens with massive activations instead of clipping them.
        self.act_gran = act_gran
        self.calib_steps = calib_steps
        self.clip_search = clip_search
        self.wgroup = int(wgroup)  # 0: one weight scale per row; g: per g input columns (transforms.expand_scales)
        self.precache = precache
        self.profile = profile
        self.calib_state = "uncalibrated" if abits > 0 else "frozen"
        self.observer: AbsObserver | None = None
        # Per-denoising-step static activation scales (DIT_STEP_SCALES): ``step_key`` is set before each call by a
        # hook on the enclosing timestep-conditioned module (quant.replace.install_step_hooks); a key seen in
        # calibration uses its own scale, any other (or None) the scale over all steps, ``act_scale``.
        self.step_scales = bool(step_scales) and abits > 0 and act_gran == "tensor"
        self.step_key: int | None = None
        self.step_observers: dict[int, AbsObserver] = {}
        self.step_act_scales: dict[int, torch.Tensor] = {}
        self.register_buffer("act_scale", torch.zeros(()), persistent=False)
        self.register_buffer("w_q", None, persistent=False)
        self.register_buffer("w_scale", None, persistent=False)
        # Packed storage (see the module docstring); persistent, since it replaces the ``weight`` parameter.
        self.packed = bool(packed) and self.weight_quant and wbits <= 8
        self.compute_dtype = linear.weight.dtype
        self.register_buffer("w_packed", None)
        self.packed_in = 0  # columns (quantisation-space input features) of the packed weight
        self._pack_codes: torch.Tensor | None = None  # codes from the pack cache, adopted by pack_weights

    @property
    def device(self) -> torch.device:
        return self.weight.device if self.weight is not None else self.w_packed.device

    # -- subclass hooks ---------------------------------------------------------------------------------------
    def to_qspace(self, x: torch.Tensor) -> torch.Tensor:
        """Map float32 inputs into the space where they are quantised."""
        return x

    def qspace_weight(self) -> torch.Tensor:
        """The float32 weight in the quantisation space (shape ``[out', in']``)."""
        return self.weight.detach().float()

    def from_qspace(self, y: torch.Tensor) -> torch.Tensor:
        """Map the matmul result back to the layer's output space and add the bias."""
        return y if self.bias is None else y + self.bias.float()

    def on_freeze(self) -> None:
        """Hook run when calibration ends, before the activation scale is taken."""

    @property
    def refines_on_freeze(self) -> bool:
        """Whether calibration changes the quantised weight (so a packed layer packs at :meth:`freeze`)."""
        return False

    # -- weights ----------------------------------------------------------------------------------------------
    @property
    def weight_quant(self) -> bool:
        return self.wbits < 16

    def quantized_weight(self) -> torch.Tensor:
        """Fake-quantised weight in the quantisation space (float32; a packed layer dequantises all of it)."""
        if self.w_packed is not None:
            return self._dequant_rows(0, self.w_packed.shape[0])
        w = self.qspace_weight()
        if not self.weight_quant:
            return w
        if self.w_scale is None:
            self.w_scale = T.weight_row_scales(w, self.wbits, self.clip_search, group=self.wgroup)
        return T.fake_quant(w, self._scales(w.shape[1]), T.qmax_for(self.wbits))

    def _scales(self, n: int, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """Rows ``r0:r1`` of ``w_scale`` broadcastable against ``n`` weight columns (per row or per group)."""
        return T.expand_scales(self.w_scale[r0:r1].float(), n, self.wgroup)

    def prepare_weights(self) -> None:
        """Compute (and with PRECACHE_WEIGHTS keep) the quantised weight once, instead of at every call.

        A packed layer whose weight is final packs it here instead (and drops the float weight)."""
        if self.packed and not self.refines_on_freeze:
            self.pack_weights()
        elif self.precache:
            self.w_q = self.quantized_weight().to(self.compute_dtype)

    def pack_weights(self) -> None:
        """Store the quantised weight as codes (``w_packed``) + per-row ``w_scale``; free the float weight."""
        if self.w_packed is not None:
            return
        qmax = T.qmax_for(self.wbits)
        codes = self._pack_codes
        if codes is None:
            if self.w_scale is None:
                self.w_scale = T.weight_row_scales(self.qspace_weight(), self.wbits, self.clip_search,
                                                   group=self.wgroup)
            # w_q (GPTQ's result, or the precached weight) holds exactly these levels times the scales.
            w = self.w_q.float() if self.w_q is not None else self.qspace_weight()
            q = T.quant_codes(w, self._scales(w.shape[1]), qmax)
            self.packed_in = q.shape[1]
            codes = T.pack_int4(q) if self.wbits <= 4 else q
            del w, q
        self.w_packed = codes.to(self.device)
        self.w_scale = self.w_scale.float().to(self.device)
        self._pack_codes = None
        self.w_q = None
        self.weight = None  # the layer now holds no float copy of its weight
        self.on_packed()

    def on_packed(self) -> None:
        """Subclass hook: shrink other buffers once the weight is packed."""

    def _dequant_rows(self, r0: int, r1: int) -> torch.Tensor:
        """Rows ``r0:r1`` of the packed weight, dequantised (float32).

        Int4 bytes go through a 256-entry table of their two codes (one gather instead of shifts, masks and an
        interleave: ~3.4x faster on CPU); the values equal :func:`quant.transforms.unpack_int4`'s."""
        p = self.w_packed[r0:r1]
        if p.dtype != torch.uint8:
            return p.float().mul_(self._scales(self.packed_in, r0, r1))
        q = F.embedding(p.int(), _int4_table(p.device)).view(p.shape[0], -1)
        if q.shape[1] != self.packed_in:
            q = q[:, : self.packed_in]
        return q.mul_(self._scales(self.packed_in, r0, r1))

    def _packed_matmul(self, xt: torch.Tensor) -> torch.Tensor:
        """``xt @ W_q^T`` dequantising one block of output rows at a time."""
        x = xt.to(self.compute_dtype)
        rows = self.w_packed.shape[0]
        step = max(1, PACKED_BLOCK_ELEMS // max(1, self.packed_in))
        if step >= rows:
            return F.linear(x, self._dequant_rows(0, rows).to(self.compute_dtype))
        y = x.new_empty(*x.shape[:-1], rows)
        for r0 in range(0, rows, step):
            y[..., r0 : r0 + step] = F.linear(x, self._dequant_rows(r0, r0 + step).to(self.compute_dtype))
        return y

    # -- calibration ------------------------------------------------------------------------------------------
    def plan_weights(self, calibrated: bool) -> None:
        """Subclass hook: decide the weight refinement before calibration starts (``calibrated``: a calibration
        set is given, as opposed to lazy calibration from serving calls)."""

    @property
    def hessian_bytes(self) -> int:
        """Bytes of the per-layer second-moment statistic calibration will hold (0: none)."""
        return 0

    def hold(self) -> None:
        """Wait for a later calibration pass: quantise weights only, observe nothing, never calibrate lazily."""
        if self.abits > 0 and self.calib_state != "frozen":
            self.calib_state = "pending"

    def start_calibration(self, calibrated: bool = True) -> None:
        """Enter explicit calibration (:func:`quant.calibration.calibrate`): observe until :meth:`freeze`."""
        self.plan_weights(calibrated)
        if self.abits <= 0:
            return
        if self.w_packed is not None and self.refines_on_freeze:
            raise RuntimeError(
                f"{self.name}: weights are packed (GR00T_DUQUANT_PACKED=1) and this layer's weights depend on "
                "calibration; re-calibrating needs the float weights, which were freed: rebuild the layer"
            )
        self.calib_state = "calibrating"
        self.observer = AbsObserver(seed=zlib.crc32(self.name.encode()))
        self.step_observers, self.step_act_scales = {}, {}
        self.reset_extra_stats()

    def reset_extra_stats(self) -> None:
        """Subclasses that need more statistics than |x_q| percentiles reset them here."""

    def observe_extra(self, x: torch.Tensor) -> None:
        """Subclass hook: raw (untransformed) input statistics."""

    def observe_qspace(self, xt: torch.Tensor) -> None:
        """Subclass hook: statistics of the inputs in the quantisation space."""

    def freeze(self) -> None:
        """End calibration: take the ACT_PCT percentile of everything observed as the activation scale."""
        if self.abits <= 0 or self.calib_state == "frozen":
            self.calib_state = "frozen"
            return
        if self.observer is None or self.observer.calls == 0:
            LOG.warning("[GR00T-DUQUANT] %s: saw no calibration data; will calibrate lazily on first use", self.name)
            self.calib_state = "uncalibrated"
            return
        self.on_freeze()
        amax = self.observer.percentile(self.act_pct)
        self.act_scale = torch.tensor(max(amax, 1e-8) / T.qmax_for(self.abits), device=self.device)
        self.step_act_scales = {
            k: torch.tensor(max(o.percentile(self.act_pct), 1e-8) / T.qmax_for(self.abits), device=self.device)
            for k, o in self.step_observers.items()
        }
        self.step_observers = {}
        self.calib_state = "frozen"
        if self.packed:
            self.pack_weights()
        LOG.debug(
            "[GR00T-DUQUANT] %s: activation scale %.4g from %d calls (%d values)",
            self.name, float(self.act_scale), self.observer.calls, self.observer.seen,
        )

    @property
    def calibration_calls(self) -> int:
        """How many forward calls contributed to the activation statistics."""
        return 0 if self.observer is None else self.observer.calls

    def _observe(self, x_raw: torch.Tensor, x_q: torch.Tensor) -> None:
        if self.calib_state == "uncalibrated":
            LOG.info(
                "[GR00T-DUQUANT] %s: not calibrated before first use; calibrating lazily from its first %d calls",
                self.name, self.calib_steps,
            )
            self.start_calibration(calibrated=False)
            self.calib_state = "lazy"
        assert self.observer is not None
        self.observe_extra(x_raw)
        self.observe_qspace(x_q)
        self.observer.observe(x_q)
        if self.step_scales and self.step_key is not None:
            if self.step_key not in self.step_observers:
                self.step_observers[self.step_key] = AbsObserver(seed=zlib.crc32(self.name.encode()) + self.step_key)
            self.step_observers[self.step_key].observe(x_q)
        if self.calib_state == "lazy" and self.observer.calls >= self.calib_steps:
            self.freeze()
            LOG.info("[GR00T-DUQUANT] %s: lazily calibrated from %d calls", self.name, self.observer.calls)

    # -- forward ----------------------------------------------------------------------------------------------
    def _section(self, phase: str, device: torch.device) -> Any:
        return PROFILER.section(self.name, phase, device) if self.profile else nullcontext()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device
        with self._section("total", dev):
            with self._section("transform_in", dev):
                xt = self.to_qspace(x.float())
            if self.abits > 0:
                with self._section("act_quant", dev):
                    if self.calib_state not in ("frozen", "pending"):
                        self._observe(x, xt)
                    if self.act_gran == "token":
                        qa = T.qmax_for(self.abits)
                        xt = T.fake_quant(xt, xt.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / qa, qa)
                    elif self.calib_state == "frozen":
                        scale = self.step_act_scales.get(self.step_key, self.act_scale) if self.step_key is not None \
                            else self.act_scale
                        xt = T.fake_quant(xt, scale, T.qmax_for(self.abits))
            if self.w_packed is not None:
                with self._section("matmul", dev):
                    yt = self._packed_matmul(xt)
            else:
                with self._section("weight", dev):
                    w = self.w_q if self.w_q is not None else self.quantized_weight().to(self.compute_dtype)
                with self._section("matmul", dev):
                    yt = F.linear(xt.to(w.dtype), w)
            with self._section("restore", dev):
                y = self.from_qspace(yt.float())
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        a = f"A{self.abits}" if self.abits > 0 else "Aoff"
        p = " packed" if self.w_packed is not None else ""
        return f"{self.name}: {self.in_features}->{self.out_features} W{self.wbits} {a} {self.method}{p}"


class RTNLinear(FakeQuantLinear):
    """Baseline: plain round-to-nearest, per-row weights (no clipping search), per-tensor percentile activations."""

    method = "rtn"

    def __init__(self, linear: nn.Linear, name: str, wbits: int, abits: int, **kw: Any) -> None:
        kw["clip_search"] = False
        super().__init__(linear, name, wbits, abits, **kw)
        self.prepare_weights()


class SmoothQuantLinear(FakeQuantLinear):
    """Baseline: SmoothQuant-style per-input-channel scaling ``s_j = max|x_j|^a / max|W_j|^(1-a)``, then RTN.

    The smoothing factor moves activation outliers into the weights (``x/s``, ``W*s``), which helps A8 but costs W4
    precision; it needs per-channel activation maxima, so weights are (re)quantised when calibration ends.
    """

    method = "smoothquant"

    def __init__(self, linear: nn.Linear, name: str, wbits: int, abits: int, alpha: float = 0.5, **kw: Any) -> None:
        kw.setdefault("clip_search", False)
        kw["step_scales"] = False  # its scale is re-taken at freeze from kept rows, over all steps
        super().__init__(linear, name, wbits, abits, **kw)
        self.alpha = alpha
        self.register_buffer("smooth", torch.ones(self.in_features), persistent=False)
        self.chan_max = torch.zeros(self.in_features)
        self.rows: AbsObserver | None = None
        self.prepare_weights()

    def reset_extra_stats(self) -> None:
        self.chan_max = torch.zeros(self.in_features)
        self.smooth = torch.ones(self.in_features, device=self.device)
        # A uniform sample of input rows over all calls (bottom-k keys, as AbsObserver does for values).
        self._rows = torch.empty(0, self.in_features)
        self._row_keys = torch.empty(0)
        self._row_cap = max(256, (1 << 18) // max(self.in_features, 1))
        self._row_gen = torch.Generator().manual_seed(zlib.crc32(self.name.encode()) + 7)

    def observe_extra(self, x: torch.Tensor) -> None:
        xr = x.detach().float().reshape(-1, self.in_features).cpu()
        self.chan_max = torch.maximum(self.chan_max, xr.abs().amax(dim=0))
        rows = torch.cat([self._rows, xr])
        keys = torch.cat([self._row_keys, torch.rand(xr.shape[0], generator=self._row_gen)])
        if keys.numel() > self._row_cap:
            keys, idx = torch.topk(keys, self._row_cap, largest=False)
            rows = rows[idx]
        self._rows, self._row_keys = rows, keys

    @property
    def refines_on_freeze(self) -> bool:
        return self.abits > 0

    def to_qspace(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.smooth

    def qspace_weight(self) -> torch.Tensor:
        return self.weight.detach().float() * self.smooth

    def on_freeze(self) -> None:
        wmax = self.weight.detach().float().abs().amax(dim=0).cpu().clamp_min(1e-5)
        s = (self.chan_max.clamp_min(1e-5) ** self.alpha) / (wmax ** (1 - self.alpha))
        self.smooth = s.clamp_min(1e-5).to(self.weight.device)
        # The percentile must be over x/s with the *final* s: recompute from the kept raw rows.
        self.observer = AbsObserver(seed=zlib.crc32(self.name.encode()))
        self.observer.observe(self._rows / self.smooth.cpu())
        self.w_scale = None
        self.prepare_weights()


class DuQuantLinear(FakeQuantLinear):
    """DuQuant-style W/A fake quantisation: zigzag permutation + block rotations, then per-row W / per-tensor A.

    ``row_rot``: ``restore`` rotates the output back (the layer computes the same function as the Linear up to
    quantisation error, exactly so with quantisation off); ``0`` uses no output rotation; ``propagate`` leaves the
    output in the rotated basis and is only accepted together with ``consumer_ok=True``, which
    :func:`quant.replace.replace_linear_layers` passes only when it has folded ``R_out`` into the next layer
    (``absorb``) — a propagate layer without an absorbing consumer would silently compute a different function.

    ``pack``: precomputed ``perm``/``r_in``/``r_out``/``w_scale`` (from the pack cache), plus ``w_codes`` (the
    packed weight) when it was written by a packed layer; computed when absent.

    Packed, a randomised-Hadamard rotation (``diag(s) H``, the default ``ROT=hadamard``) is kept as its int8 signs
    ``r_in_sign``/``r_out_sign`` and applied as ``(x * s) H`` with one shared ``H``: bit-for-bit the same matrix,
    ~1/64 of the fp32 bytes, which matters at small widths (at 512x512 the fp32 rotations alone are 0.12x the fp16
    weight). Use :meth:`rotation_in`/:meth:`rotation_out` for the full matrices.
    """

    method = "duquant"

    def __init__(
        self,
        linear: nn.Linear,
        name: str,
        wbits: int,
        abits: int,
        block: int = 16,
        block_out: int | None = None,
        permute: bool = True,
        row_rot: str = "restore",
        rot: str = "hadamard",
        ls: float = 0.15,
        pre_rot: torch.Tensor | None = None,
        consumer_ok: bool = False,
        pack: dict[str, torch.Tensor] | None = None,
        wopt: str = "clip",
        gptq_damp: float = 0.01,
        gptq_act_order: bool = False,
        **kw: Any,
    ) -> None:
        super().__init__(linear, name, wbits, abits, **kw)
        if row_rot not in ("restore", "propagate", "0"):
            raise ValueError(f"row_rot must be restore|propagate|0, got {row_rot!r}")
        if row_rot == "propagate" and not consumer_ok:
            raise ValueError(
                f"{name}: ROW_ROT=propagate needs a next layer that absorbs this layer's output rotation; none was "
                "given, and leaving the output rotated would silently change the model's function"
            )
        self.block = block
        self.block_out = block_out or block
        self.permute = permute
        self.row_rot = row_rot
        self.rot = rot
        self.ls = ls
        if row_rot == "propagate" and self.out_features % self.block_out:
            raise ValueError(f"{name}: propagate needs out_features divisible by BLOCK_OUT={self.block_out}")
        # pre_rot: a producer's output rotation folded into this layer's input (x arrives as x R_pre).
        self.register_buffer("pre_rot", pre_rot.float() if pre_rot is not None else None, persistent=False)
        self.register_buffer("perm", None, persistent=False)
        self.register_buffer("r_in", None, persistent=False)
        self.register_buffer("r_out", None, persistent=False)
        self.register_buffer("bias_t", None, persistent=False)
        self.register_buffer("r_in_sign", None, persistent=False)
        self.register_buffer("r_out_sign", None, persistent=False)
        if wopt not in WOPT_MODES:
            raise ValueError(f"wopt must be one of {WOPT_MODES}, got {wopt!r}")
        # Data-aware weight refinement needs calibration; without activation quantisation there is none.
        self.wopt = wopt if abits > 0 else "clip"
        # What this calibration runs: ``auto`` is resolved by plan_weights (gptq with a calibration set, else clip).
        self.wopt_run = "clip" if self.wopt == "auto" else self.wopt
        self.gptq_damp = gptq_damp
        self.gptq_act_order = gptq_act_order
        self.wopt_samples = 0  # calibration calls the refined weights came from (0: data free)
        self._h: torch.Tensor | None = None
        self._h_rows = 0
        self.pack_reused = pack is not None
        self._build(pack)
        self.prepare_weights()

    @property
    def refines_on_freeze(self) -> bool:
        if not self.weight_quant:
            return False
        # ``auto`` on a packed layer packs the data-free weights at construction (the float weight is freed at
        # once); :func:`server.policies.quantize.apply_duquant` resolves ``auto`` to ``gptq`` before replacement
        # when it has a calibration set, so a packed server layer still gets GPTQ and packs at freeze.
        return not self.packed if self.wopt == "auto" else self.wopt != "clip"

    def reset_extra_stats(self) -> None:
        self._h, self._h_rows = None, 0

    def plan_weights(self, calibrated: bool) -> None:
        if self.wopt == "auto":
            self.wopt_run = "gptq" if calibrated and self.weight is not None and self.refines_on_freeze else "clip"

    @property
    def hessian_bytes(self) -> int:
        if not self.weight_quant or self.wopt_run == "clip" or self.abits <= 0:
            return 0
        n = self.perm.numel()
        return n * n * 4 if self.wopt_run == "gptq" else n * 4

    @property
    def weights_desc(self) -> str:
        """How the weights were rounded, for the log: GPTQ/act-weighted (calibrated) or RTN (data free)."""
        if not self.weight_quant:
            return "float"
        if self.wopt_run == "clip" or self.wopt_samples == 0:
            return "RTN (data-free)"
        return f"{'GPTQ' if self.wopt_run == 'gptq' else 'act-weighted RTN'} (calibrated, {self.wopt_samples} samples)"

    def observe_qspace(self, xt: torch.Tensor) -> None:
        """Accumulate ``E[x_t^2]`` (``act``) or ``E[x_t x_t^T]`` (``gptq``) of the transformed inputs."""
        if self.wopt_run == "clip" or not self.weight_quant:
            return
        x = xt.detach().reshape(-1, xt.shape[-1]).float()
        stat = x.pow(2).sum(0) if self.wopt_run == "act" else x.t() @ x
        self._h = stat if self._h is None else self._h + stat
        self._h_rows += x.shape[0]

    def on_freeze(self) -> None:
        """Refine the quantised weight with the calibration statistics (``WOPT=act|gptq``)."""
        if self._h is None or self._h_rows == 0:
            return
        h = self._h / self._h_rows
        w = self.qspace_weight()
        diag = h if h.dim() == 1 else torch.diagonal(h)
        self.w_scale = T.weight_row_scales(w, self.wbits, self.clip_search, importance=diag, group=self.wgroup)
        if self.wopt_run == "gptq":
            # GPTQ's result is not a function of (weight, scale) alone, so it is always kept (PRECACHE ignored).
            self.w_q = T.gptq_quantize(w, self.w_scale, self.wbits, h, damp=self.gptq_damp,
                                       act_order=self.gptq_act_order, group=self.wgroup).to(self.compute_dtype)
        else:
            self.prepare_weights()
        self.wopt_samples = self.observer.calls if self.observer is not None else 0
        self._h = None

    def effective_weight(self) -> torch.Tensor:
        """The float32 weight this layer must reproduce: ``W`` or, when absorbing a producer rotation, ``W R_pre``."""
        if self.weight is None:
            raise RuntimeError(f"{self.name}: the float weight was freed when it was packed (PACKED=1)")
        w = self.weight.detach().float()
        if self.pre_rot is not None:
            w = T.rotate_last(w, self.pre_rot.to(w.device))
        return w

    def _build(self, pack: dict[str, torch.Tensor] | None) -> None:
        dev = self.weight.device
        if pack is None:
            w = self.effective_weight().cpu()
            seed = zlib.crc32(self.name.encode())
            perm, r_in = T.build_input_transform(w, self.block, self.permute, self.rot, self.ls, seed)
            r_out = None
            if self.row_rot != "0":
                w_in = T.transform_weight(w, perm, r_in, None, self.block_out)
                w_in = F.pad(w_in, (0, 0, 0, T.padded(self.out_features, self.block_out) - self.out_features))
                r_out = T.build_output_transform(w_in, self.block_out, self.rot, seed + 1)
            pack = {"perm": perm, "r_in": r_in}
            if r_out is not None:
                pack["r_out"] = r_out
        self.perm = pack["perm"].to(dev)
        self.r_in = pack["r_in"].float().to(dev)
        self.r_out = pack["r_out"].float().to(dev) if "r_out" in pack else None
        if "w_scale" in pack and self.weight_quant:
            self.w_scale = pack["w_scale"].float().to(dev)
            codes = pack.get("w_codes")
            if codes is not None and self.packed and not self.refines_on_freeze:
                in_pad = self.perm.numel()
                want = (self.w_scale.shape[0], (in_pad + 1) // 2 if self.wbits <= 4 else in_pad)
                dtype = torch.uint8 if self.wbits <= 4 else torch.int8
                if tuple(codes.shape) == want and codes.dtype == dtype:
                    self._pack_codes, self.packed_in = codes, in_pad
                else:
                    LOG.warning("[GR00T-DUQUANT] %s: cached packed codes have shape %s %s, expected %s %s; "
                                "re-packing from the float weight", self.name, tuple(codes.shape), codes.dtype,
                                want, dtype)
        if self.bias is not None and self.r_out is not None:
            b = F.pad(self.bias.detach().float(), (0, T.padded(self.out_features, self.block_out) - self.out_features))
            self.bias_t = T.rotate_last(b, self.r_out) if self.row_rot == "propagate" else None

    def pack_tensors(self) -> dict[str, torch.Tensor]:
        """What the pack cache stores for this layer (CPU tensors); with a packed weight also its codes."""
        out = {"perm": self.perm.cpu(), "r_in": self.rotation_in().cpu()}
        r_out = self.rotation_out()
        if r_out is not None:
            out["r_out"] = r_out.cpu()
        if self.weight_quant:
            if self.w_scale is None:
                self.w_scale = T.weight_row_scales(self.qspace_weight(), self.wbits, self.clip_search,
                                                   group=self.wgroup)
            out["w_scale"] = self.w_scale.cpu()
        if self.w_packed is not None and not self.refines_on_freeze:
            out["w_codes"] = self.w_packed.cpu()
        return out

    # -- rotations (full fp32 blocks, or int8 signs of a randomised Hadamard once packed) ----------------------
    def _rotation(self, which: str) -> torch.Tensor | None:
        r = getattr(self, "r_" + which)
        sign = getattr(self, f"r_{which}_sign")
        if r is not None or sign is None:
            return r
        h = _hadamard_on(sign.shape[-1], sign.device, torch.float32)
        return sign.float().unsqueeze(-1) * h.unsqueeze(0)

    def rotation_in(self) -> torch.Tensor:
        """``r_in`` as ``[nb, block, block]`` float32 (materialised from the signs when compacted)."""
        r = self._rotation("in")
        assert r is not None
        return r

    def rotation_out(self) -> torch.Tensor | None:
        """``r_out`` as ``[nbo, block_out, block_out]`` float32, or ``None`` without an output rotation."""
        return self._rotation("out")

    def _rotate(self, x: torch.Tensor, which: str, transpose: bool = False) -> torch.Tensor:
        r = getattr(self, "r_" + which)
        if r is not None:
            return T.rotate_last(x, r, transpose=transpose)
        sign = getattr(self, f"r_{which}_sign")
        nb, b = sign.shape
        h = _hadamard_on(b, x.device, x.dtype)  # symmetric: H^T = H
        s = sign.to(x.dtype)
        xb = x.reshape(*x.shape[:-1], nb, b)
        yb = (xb @ h) * s if transpose else (xb * s) @ h  # x (diag(s) H)^T = (x H) diag(s)
        return yb.reshape(x.shape)

    def on_packed(self) -> None:
        """Keep a randomised-Hadamard rotation as its signs (exactly the same matrix, see the class docstring)."""
        for which in ("in", "out"):
            r = getattr(self, "r_" + which)
            if r is None:
                continue
            b = r.shape[-1]
            if b & (b - 1):
                continue
            sign = torch.sign(r[:, :, 0])  # column 0 of H is all +1/sqrt(b)
            if torch.equal(sign.unsqueeze(-1) * _hadamard_on(b, r.device, r.dtype).unsqueeze(0), r):
                setattr(self, f"r_{which}_sign", sign.to(torch.int8))
                setattr(self, "r_" + which, None)

    @property
    def has_out_rotation(self) -> bool:
        return self.r_out is not None or self.r_out_sign is not None

    def to_qspace(self, x: torch.Tensor) -> torch.Tensor:
        in_pad = self.perm.numel()
        if in_pad != self.in_features:
            x = F.pad(x, (0, in_pad - self.in_features))
        if self.permute:
            x = x.index_select(-1, self.perm)
        return self._rotate(x, "in")

    def qspace_weight(self) -> torch.Tensor:
        return T.transform_weight(self.effective_weight(), self.perm, self.r_in, self.r_out, self.block_out)

    def from_qspace(self, y: torch.Tensor) -> torch.Tensor:
        if not self.has_out_rotation:
            return y if self.bias is None else y + self.bias.float()
        if self.row_rot == "propagate":
            y = y[..., : self.out_features]
            return y if self.bias_t is None else y + self.bias_t[: self.out_features]
        y = self._rotate(y, "out", transpose=True)[..., : self.out_features]
        return y if self.bias is None else y + self.bias.float()

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f" block={self.block} block_out={self.block_out} permute={int(self.permute)} row_rot={self.row_rot}"
            + f" rot={self.rot}"
        )
