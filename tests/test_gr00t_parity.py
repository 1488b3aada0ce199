"""GR00T N1.5 inputs against upstream facts: the Eagle 2.5 prompt and SigLIP ``select_layer`` semantics.

Facts (Isaac-GR00T ``gr00t/model/transforms.py``, ``backbone/eagle2_hg_model/{config.json,
processing_eagle2_5_vl.py}``): the instruction is ``str([instruction])``; one user turn with the images first,
rendered by the Eagle 2.5 chat template with the generation prompt; each ``<image-k>`` becomes the text
``<image k>`` + ``<img>`` + ``<IMG_CONTEXT>`` x n + ``</img>``; the released vision ``select_layer`` is -1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from models import load_pretrained
from models.gr00t.backbone import EagleModel
from models.gr00t.config import EAGLE_N15_DEFAULT, GR00TConfig
from models.gr00t.prompt import (
    PROMPT_LEGACY,
    PROMPT_UPSTREAM,
    legacy_prompt_ids,
    load_prompt_tokenizer,
    read_chat_template,
    upstream_prompt,
    upstream_prompt_ids,
)
from models.gr00t.tiny import build_tiny, tiny_config

TINY = Path(__file__).resolve().parents[1] / "models" / "checkpoints" / "gr00t-n1.5-tiny-libero-spatial"
CTX3 = "<IMG_CONTEXT>" * 3
EXPECTED_TWO_VIEWS = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "<|im_start|>user\n"
    f"<image 1><img>{CTX3}</img><image 2><img>{CTX3}</img>"
    "['pick up the bowl']<|im_end|>\n"
    "<|im_start|>assistant\n"
)


def test_upstream_prompt_text_and_ids_from_released_layout_dir() -> None:
    tok, template = load_prompt_tokenizer(TINY)
    text = upstream_prompt("pick up the bowl", num_images=2, tokens_per_image=3, template=template)
    assert text == EXPECTED_TWO_VIEWS
    ids = upstream_prompt_ids(tok, "pick up the bowl", 2, 3, template)
    assert ids == tok.encode(EXPECTED_TWO_VIEWS).ids
    assert ids.count(tok.token_to_id("<IMG_CONTEXT>")) == 6


def test_upstream_prompt_single_view_and_quote_in_instruction() -> None:
    text = upstream_prompt("it's the bowl", num_images=1, tokens_per_image=2)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<image 1><img><IMG_CONTEXT><IMG_CONTEXT></img>[\"it's the bowl\"]<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_is_read_from_the_directory(tmp_path: Path) -> None:
    assert read_chat_template(TINY) == read_chat_template(None)  # tiny dir ships none: the bundled Eagle one
    # the tokenizer's own template (N1.5: Qwen3's text template) is never the processor's: ignored
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "X{{ messages[0]['role'] }}"}))
    assert read_chat_template(tmp_path) == read_chat_template(None)
    (tmp_path / "processor_config.json").write_text(json.dumps({"chat_template": "P"}))
    assert read_chat_template(tmp_path) == "P"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages[0]['role'] }}")
    assert read_chat_template(tmp_path) == "J{{ messages[0]['role'] }}"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "Y"}))
    assert read_chat_template(tmp_path) == "Y"


def test_model_builds_the_declared_prompt_format() -> None:
    model = build_tiny(seed=0)
    assert model.config.prompt_format == PROMPT_UPSTREAM and model.config.to_dict()["prompt_format"] == PROMPT_UPSTREAM
    ids, mask = model.build_input_ids(["pick up the bowl"], 2)
    want = upstream_prompt_ids(model.tokenizer, "pick up the bowl", 2, model.tokens_per_image)
    assert ids[0].tolist() == want and bool(mask.all())

    legacy = build_tiny(seed=0, prompt_format=PROMPT_LEGACY)
    ids, _ = legacy.build_input_ids(["pick up the bowl"], 2)
    ctx = int(legacy.config.eagle_config["image_token_index"])
    assert ids[0].tolist() == legacy_prompt_ids(legacy.tokenizer, "pick up the bowl", 2, legacy.tokens_per_image, ctx)


def test_released_config_without_key_is_upstream_and_bad_value_rejected() -> None:
    d = GR00TConfig().to_dict()
    d.pop("prompt_format")
    assert GR00TConfig.from_dict(d).prompt_format == PROMPT_UPSTREAM
    d["prompt_format"] = "nope"
    with pytest.raises(Exception, match="prompt_format"):
        GR00TConfig.from_dict(d)


def test_shipped_tiny_checkpoint_declares_upstreams_prompt_and_a_legacy_copy_keeps_its_own(tmp_path) -> None:
    """The retrained tiny GR00T (2026-12-02) was trained with upstream's Eagle 2.5 chat prompt and says so; a
    checkpoint declaring the project's earlier format still loads with that format (its weights expect it)."""
    import shutil

    cfg = json.loads((TINY / "config.json").read_text())
    assert cfg["prompt_format"] == PROMPT_UPSTREAM and cfg["eagle_config"]["select_layer"] == 2
    model = load_pretrained("gr00t", TINY)
    assert model.config.prompt_format == PROMPT_UPSTREAM
    assert model.backbone.eagle_model.vision_select_layer == 2
    legacy = tmp_path / "legacy"
    shutil.copytree(TINY, legacy)
    (legacy / "config.json").write_text(json.dumps({**cfg, "prompt_format": PROMPT_LEGACY}))
    assert load_pretrained("gr00t", legacy).config.prompt_format == PROMPT_LEGACY


def test_default_vision_select_layer_is_the_released_eagle_value() -> None:
    assert EAGLE_N15_DEFAULT["select_layer"] == -1  # eagle2_hg_model/config.json (N1.5): "select_layer": -1
    assert GR00TConfig().eagle_config["select_layer"] == -1


@pytest.fixture(scope="module")
def eagle() -> EagleModel:
    cfg = tiny_config(576, 517).to_dict()
    cfg["eagle_config"]["vision_config"]["num_hidden_layers"] = 3
    torch.manual_seed(0)
    em = EagleModel(GR00TConfig.from_dict(cfg)).eval()
    with torch.no_grad():  # non-trivial post-LN so -1 differs from hidden_states[-1]
        em.vision_model.post_layernorm.weight.uniform_(0.5, 1.5)
        em.vision_model.post_layernorm.bias.uniform_(-0.5, 0.5)
    return em


@pytest.mark.parametrize("k", [-1, -2, -3, -4, 0, 1, 2, 3])
def test_vision_select_layer_equals_hf_hidden_states(eagle: EagleModel, k: int) -> None:
    vm = eagle.vision_model
    px = torch.randn(2, 3, 112, 112, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = [vm.embeddings(px)]  # independent loop: hidden[i] = output after i encoder layers
        for layer in vm.encoder.layers:
            out = layer(hidden[-1], None)
            hidden.append(out[0] if isinstance(out, tuple) else out)
        ref = vm(pixel_values=px).last_hidden_state if k == -1 else hidden[k]
        if k == -1:
            assert torch.allclose(ref, vm.post_layernorm(hidden[-1]), atol=1e-5)
        eagle.vision_select_layer = k
        got = eagle.extract_feature(px)
    assert torch.allclose(got, eagle.mlp1(ref), atol=1e-5)


def test_vision_select_layer_out_of_range(eagle: EagleModel) -> None:
    eagle.vision_select_layer = -5
    with pytest.raises(ValueError, match="select_layer"):
        eagle.extract_feature(torch.zeros(1, 3, 112, 112))
    eagle.vision_select_layer = -1
