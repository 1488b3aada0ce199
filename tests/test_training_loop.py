"""The shared training loop (models/common/training.py): schedule, exact resume, atomic checkpoints, progress."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from models.common import training
from models.common.training import Batch, TrainConfig, fit, lr_at, make_batch


class Toy(nn.Module):
    """A small regression model whose loss also draws torch noise (like dropout or flow-matching noise)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(4, 16), nn.GELU(), nn.Linear(16, 1))
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(64, 4, generator=g)
        self.y = self.x.sum(1, keepdim=True)

    def loss(self, batch: Batch) -> torch.Tensor:
        idx = torch.from_numpy(batch.index)
        noise = 0.01 * torch.randn(len(idx), 1)  # global torch RNG: seeded per step by the loop
        jitter = float(batch.rng.normal())  # the batch's numpy generator
        return ((self.net(self.x[idx]) - self.y[idx] - noise) ** 2).mean() * (1 + 0.01 * jitter)


def _cfg(**kw) -> TrainConfig:
    base = {"steps": 12, "batch_size": 8, "lr": 1e-2, "warmup_steps": 3, "min_lr_frac": 0.1, "grad_clip": 1.0,
            "seed": 5, "progress": False}
    return TrainConfig(**(base | kw))


def test_schedule_values() -> None:
    cfg = TrainConfig(steps=110, batch_size=1, lr=1.0, warmup_steps=10, min_lr_frac=0.02)
    assert [lr_at(s, cfg) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])
    assert lr_at(9, cfg) == pytest.approx(1.0) and lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.02 + 0.98 * 0.5)  # half-way through the cosine
    assert lr_at(110, cfg) == pytest.approx(0.02) and lr_at(500, cfg) == pytest.approx(0.02)
    lrs = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:], strict=False))
    no_warm = TrainConfig(steps=4, batch_size=1, lr=2.0)
    assert lr_at(0, no_warm) == pytest.approx(2.0) and lr_at(2, no_warm) == pytest.approx(1.0)
    assert lr_at(1, no_warm) == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi / 4)))


def test_batch_schedule_is_a_function_of_seed_and_step() -> None:
    a, b = make_batch(3, 7, 100, 16), make_batch(3, 7, 100, 16)
    np.testing.assert_array_equal(a.index, b.index)
    assert a.seed == b.seed and a.rng.normal() == b.rng.normal()
    assert torch.equal(torch.rand(3, generator=a.generator), torch.rand(3, generator=b.generator))
    assert not np.array_equal(a.index, make_batch(3, 8, 100, 16).index)
    assert not np.array_equal(a.index, make_batch(4, 7, 100, 16).index)
    assert a.index.min() >= 0 and a.index.max() < 100


def test_extra_share_fixes_each_batchs_mix_and_stays_a_function_of_seed_and_step() -> None:
    """--extra-share: samples 90..99 (say, DAgger labels after 90 demonstration samples) are a fixed quarter of
    every batch, not their 10% share of the samples; every micro-batch gets some (the batch is shuffled)."""
    extra = (90, 0.25)
    a = make_batch(3, 7, 100, 16, extra=extra)
    np.testing.assert_array_equal(a.index, make_batch(3, 7, 100, 16, extra=extra).index)
    for step in range(20):
        idx = make_batch(3, step, 100, 16, extra=extra).index
        assert (idx >= 90).sum() == 4 and idx.min() >= 0 and idx.max() < 100
    halves = [make_batch(3, s, 100, 16, m, 2, extra=extra).index for s in range(20) for m in range(2)]
    assert sum(int((h >= 90).any()) for h in halves) > 30  # shuffled: not all extras in one micro-batch
    with pytest.raises(ValueError, match="outside 1..99"):
        make_batch(3, 7, 100, 16, extra=(100, 0.25))
    model = nn.Linear(2, 1)
    seen: list[np.ndarray] = []

    def loss(batch):  # noqa: ANN001, ANN202
        seen.append(batch.index)
        return model(torch.zeros(len(batch.index), 2)).sum()

    fit(model, 100, TrainConfig(steps=3, batch_size=8, lr=1e-3, progress=False, extra_start=90, extra_share=0.5),
        loss)
    assert [int((i >= 90).sum()) for i in seen] == [4, 4, 4]


def test_extra_share_flag_is_checked_before_training() -> None:
    from client.dataset import extra_share_kwargs

    assert extra_share_kwargs(None, 90, 100) == {}
    assert extra_share_kwargs(0.3, 90, 100) == {"extra_start": 90, "extra_share": 0.3}
    with pytest.raises(SystemExit, match="--extra-share must be between 0 and 1"):
        extra_share_kwargs(1.0, 90, 100)
    with pytest.raises(SystemExit, match="--extra-share needs --extra-demos"):
        extra_share_kwargs(0.3, 90, 90)


def test_resume_is_exact(tmp_path: Path) -> None:
    full = Toy()
    r_full = fit(full, 64, _cfg(), checkpoint_dir=tmp_path / "full")
    assert r_full.step == 12 and not r_full.stopped and len(r_full.losses) == 12

    split = Toy()
    r1 = fit(split, 64, _cfg(stop_at=5), checkpoint_dir=tmp_path / "split", meta={"who": "test"})
    assert r1.stopped and r1.step == 5
    state = json.loads((tmp_path / "split" / "state.json").read_text())
    assert state["step"] == 5 and state["meta"] == {"who": "test"}

    resumed = Toy()  # a fresh process: same construction, then the checkpoint
    r2 = fit(resumed, 64, _cfg(), checkpoint_dir=tmp_path / "split", resume=True)
    assert r2.step == 12 and [s for s, _ in r2.losses] == list(range(6, 13)) and r2.meta == {"who": "test"}
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), k
    assert [s for s, _ in r2.losses] == [s for s, _ in r_full.losses[5:]]
    assert [v for _, v in r2.losses] == [v for _, v in r_full.losses[5:]]
    assert not full.training  # left in eval mode


def test_resume_without_checkpoint_starts_fresh(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="models.common.training"):
        r = fit(Toy(), 64, _cfg(steps=2), checkpoint_dir=tmp_path / "none", resume=True)
    assert r.step == 2 and "no checkpoint" in caplog.text


def test_checkpoint_files_and_atomic_replace(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    model = Toy()
    fit(model, 64, _cfg(steps=4, save_every=2), checkpoint_dir=tmp_path / "ck")
    d = tmp_path / "ck"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no .tmp / .old left behind
    weights = load_file(str(d / training.WEIGHTS_FILE))
    assert weights.keys() == model.state_dict().keys()
    opt_state = torch.load(d / training.OPTIMIZER_FILE, weights_only=True)
    assert "state" in opt_state and "param_groups" in opt_state
    assert json.loads((d / training.STATE_FILE).read_text())["step"] == 4

    # a save interrupted while writing leaves only a temporary directory: the checkpoint is untouched
    (tmp_path / "ck.tmp").mkdir()
    (tmp_path / "ck.tmp" / training.STATE_FILE).write_text("{half")
    assert training.read_checkpoint_state(d)["step"] == 4
    # a save cut between its two renames: the previous checkpoint is still found (as ck.old)
    d.replace(tmp_path / "ck.old")
    assert training.find_checkpoint(d) == tmp_path / "ck.old"
    fresh = Toy()
    opt = torch.optim.AdamW(fresh.parameters())
    assert training.load_checkpoint(d, fresh, opt)["step"] == 4
    for k, v in fresh.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    # the next save cleans up both
    training.save_checkpoint(d, fresh, opt, {"step": 4})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_tied_weights_are_saved(tmp_path: Path) -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(10, 4)
            self.head = nn.Linear(4, 10, bias=False)
            self.head.weight = self.embed.weight

        def loss(self, batch: Batch) -> torch.Tensor:
            tok = torch.from_numpy(batch.index % 10)
            return nn.functional.cross_entropy(self.head(self.embed(tok)), tok)

    m = Tied()
    r = fit(m, 10, _cfg(steps=3), checkpoint_dir=tmp_path / "tied")
    assert r.step == 3 and m.head.weight is m.embed.weight
    fresh = Tied()
    training.load_checkpoint(tmp_path / "tied", fresh, torch.optim.AdamW(fresh.parameters()))
    assert torch.equal(fresh.embed.weight, m.embed.weight) and fresh.head.weight is fresh.embed.weight


def test_progress_log_lines_history_and_validation(caplog: pytest.LogCaptureFixture) -> None:
    model = Toy()
    calls: list[bool] = []

    def validate() -> dict[str, float]:
        calls.append(model.training)
        model.eval()  # a validation function may switch modes; the loop switches back
        return {"val_metric": 1.5}

    def loss_fn(batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        assert model.training
        return model.loss(batch), {"extra": 2.0}

    with caplog.at_level(logging.INFO, logger="models.common.training"):
        r = fit(model, 64, _cfg(steps=10, log_every=4, eval_every=5, desc="toy"), loss_fn, validate=validate)
    lines = [rec.getMessage() for rec in caplog.records if rec.getMessage().startswith("toy step")]
    assert [ln.split(":")[0] for ln in lines] == ["toy step 4/10", "toy step 5/10", "toy step 8/10", "toy step 10/10"]
    assert all("loss=" in ln and "steps/s" in ln for ln in lines)
    assert len(calls) == 2  # steps 5 and 10
    assert [h["step"] for h in r.history] == [4, 5, 8, 10]
    assert r.history[1]["val_metric"] == 1.5 and r.history[0]["extra"] == 2.0 and "val_metric" not in r.history[0]
    assert all(set(h) >= {"step", "loss", "lr"} for h in r.history)


def test_rejects_empty_data() -> None:
    with pytest.raises(ValueError, match="no training samples"):
        fit(Toy(), 0, _cfg())


def test_ema_weights_are_the_result_and_resume_exactly(tmp_path: Path) -> None:
    """With ``ema_decay`` the model ends holding the average of the iterates (not the last one), validation sees
    the average, and a run stopped and resumed ends bit-identical to an uninterrupted one (EMA in the checkpoint)."""
    seen: list[torch.Tensor] = []
    a = Toy()
    raw = Toy()
    fit(raw, 64, _cfg())
    fit(a, 64, _cfg(ema_decay=0.9, eval_every=12),
        validate=lambda: seen.append(a.net[0].weight.detach().clone()) or {"v": 0.0})
    # same trajectory as without EMA; the result is the EMA, which differs from the last iterate
    assert not torch.equal(a.net[0].weight, raw.net[0].weight)
    torch.testing.assert_close(seen[-1], a.net[0].weight)
    # the EMA recurrence by hand over the iterates of a run without EMA (captured as each step's loss is taken)
    plain = Toy()
    iterates = [plain.net[0].weight.detach().clone()]

    def capture(batch: Batch) -> torch.Tensor:
        iterates.append(plain.net[0].weight.detach().clone())
        return plain.loss(batch)

    fit(plain, 64, _cfg(), capture)
    iterates = iterates[:1] + iterates[2:] + [plain.net[0].weight.detach().clone()]  # after steps 1..12
    hand = iterates[0].clone()
    for step in range(12):
        d = min(0.9, (1 + step) / (10 + step))
        hand = d * hand + (1 - d) * iterates[step + 1]
    torch.testing.assert_close(hand, a.net[0].weight)
    b = Toy()
    r1 = fit(b, 64, _cfg(ema_decay=0.9, stop_at=5), checkpoint_dir=tmp_path / "ck", resume=True)
    assert r1.stopped and (tmp_path / "ck" / training.EMA_FILE).is_file()
    c = Toy()
    fit(c, 64, _cfg(ema_decay=0.9), checkpoint_dir=tmp_path / "ck", resume=True)
    torch.testing.assert_close(c.net[0].weight, a.net[0].weight, rtol=0, atol=0)
    with pytest.raises(ValueError, match="ema_decay"):
        fit(Toy(), 64, _cfg(ema_decay=1.5))
