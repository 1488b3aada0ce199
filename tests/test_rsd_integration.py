"""RSD glue to the other components: tiny OpenVLA (Prismatic) prefix from models/, RFSQ tokenizer decode."""

from __future__ import annotations

import pytest
import torch

from rsd.config import RSDConfig
from rsd.draft import RFSQDraftModel
from rsd.engine import SpeculativeDecoder
from rsd.layer_head import RFSQLayerHeadModel

tiny = pytest.importorskip("models.openvla.tiny")
torch.set_num_threads(1)


def test_rsd_on_tiny_openvla_prefix():
    vla = tiny.build_tiny("tiny").eval()
    main = RFSQLayerHeadModel(vla.language_model).eval()
    size = vla.config.image_sizes[0]
    channels = 6 if getattr(vla.config, "use_fused_vision_backbone", True) else 3
    g = torch.Generator().manual_seed(0)
    px = torch.randn(2, channels, size, size, generator=g)
    ids = torch.randint(3, 100, (2, 10), generator=g)
    ids[:, 0] = 1
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :2] = 0  # left-padded row: BOS at index 2
    ids[0, :2] = 0
    ids[0, 2] = 1
    with torch.no_grad():
        embeds = vla.embed_prefix(px, ids, mask)
        full_mask = vla.extend_attention_mask(mask, 2, 10)
    hidden = vla.language_model.config.hidden_size
    draft = RFSQDraftModel(input_dim=hidden, hidden_dim=64, feedforward_dim=128, num_heads=8).eval()
    greedy = main.decode_greedy(embeds, full_mask)
    tokens, stats = SpeculativeDecoder(main, draft, RSDConfig(mode="exact")).generate(embeds, full_mask)
    assert tokens.shape == (2, 8, 128)
    assert torch.equal(tokens, greedy)
    assert 5 <= stats.main_passes <= 7


def test_decode_actions_with_rfsq_tokenizer():
    """Layer layout glue: engine layers [B, L, 128] -> tokenizer tokens [B, 8, 16, L] -> actions [B, 8, 7]."""
    rfsq = pytest.importorskip("rsd.rfsq")
    normalization = pytest.importorskip("rsd.normalization")
    import numpy as np

    torch.manual_seed(0)
    ae = rfsq.RFSQAutoencoder(rfsq.RFSQConfig(hidden_dim=32)).eval()
    tok = rfsq.RFSQTokenizer(ae, normalization.ActionNormalizer(q01=-np.ones(7), q99=np.ones(7)))
    actions = torch.rand(2, 8, 7) * 2 - 1
    tokens = tok.encode(actions)
    layers = tok.tokens_to_layers(tokens)
    assert layers.shape == (2, 8, 128)
    main = RFSQLayerHeadModel(_tiny_llama()).eval()
    eng = SpeculativeDecoder(main, None, RSDConfig(enabled=False, action_decode="greedy"), tokenizer=tok)
    torch.testing.assert_close(eng.decode_actions(layers), tok.decode(tokens))


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=16, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(cfg)
