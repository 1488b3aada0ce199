"""Main model RFSQ layer head: prefill/step/teacher-forced consistency, left padding, training, persistence."""

from __future__ import annotations

import pytest
import torch
from rsd_helpers import tiny_main

from rsd.layer_head import load_layer_head_model, save_layer_head_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def main():
    return tiny_main(seed=11, hidden=32, sharpen=5.0)


def test_shapes_and_prefill(main):
    x = torch.randn(3, 5, 32)
    pre = main.prefill(x)
    assert pre.hidden_last.shape == (3, 32)
    assert pre.logits0.shape == (3, 128, 7)
    assert pre.cache.num_fed == 0
    logits = main.step(torch.zeros(3, 2, 128, dtype=torch.long), pre.cache)
    assert logits.shape == (3, 2, 128, 7)
    assert pre.cache.num_fed == 2


def test_teacher_forced_matches_greedy_decoding(main):
    """Training forward over greedy tokens reproduces the logits the decoder used (argmax = greedy)."""
    x = torch.randn(2, 5, 32)
    greedy = main.decode_greedy(x)
    _, logits = main(x, greedy)
    assert logits.shape == (2, 8, 128, 7)
    assert torch.equal(logits.argmax(-1), greedy)


def test_left_padding_is_invisible(main):
    x = torch.randn(2, 5, 32)
    ref = main.decode_greedy(x)
    padded = torch.cat([torch.zeros(2, 3, 32), x], dim=1)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[:, :3] = 0
    assert torch.equal(main.decode_greedy(padded, mask), ref)
    # mixed lengths in one batch: sample 1 unpadded and longer
    x2 = torch.randn(1, 8, 32)
    batch = torch.cat([padded[:1], x2])
    mask2 = torch.ones(2, 8, dtype=torch.long)
    mask2[0, :3] = 0
    out = main.decode_greedy(batch, mask2)
    assert torch.equal(out[0], ref[0]) and torch.equal(out[1], main.decode_greedy(x2)[0])


def test_right_padding_refused(main):
    mask = torch.ones(1, 4, dtype=torch.long)
    mask[0, -1] = 0
    with pytest.raises(ValueError, match="left-padded"):
        main.prefill(torch.randn(1, 4, 32), mask)


def test_training_reduces_loss():
    model = tiny_main(seed=12, hidden=32, num_layers=4, codes=8)
    model.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, 32, generator=g)
    y = torch.randint(0, 7, (16, 4, 8), generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss, _ = model(x, y)
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert float(loss.detach()) < 0.5 * first


def test_save_load_roundtrip(tmp_path, main):
    save_layer_head_model(main, tmp_path)
    loaded = load_layer_head_model(tmp_path)
    x = torch.randn(2, 5, 32)
    assert torch.equal(loaded.decode_greedy(x), main.decode_greedy(x))
    assert set(main.head_state_dict()) == {"code_embed.weight", "layer_embed.weight", "head.weight", "head.bias"}
