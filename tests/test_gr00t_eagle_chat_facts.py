"""GR00T N1.5's Eagle 2.5 prompt against the released files' facts (``models/fixtures/gr00t_n15_eagle_chat_facts.json``).

The fixture records, from a named NVIDIA/Isaac-GR00T commit, the ``chat_template.json`` text, how GR00T calls
``apply_chat_template``, how the Eagle processor expands each ``<image-k>``, the special-token ids and the
bundled Eagle config. The reference prompt here is built from those facts alone: the template rendered by
transformers' own chat-template renderer (``apply_chat_template`` semantics), then the expansion applied as the
fixture states it; the project's prompt must equal it exactly.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from models.gr00t.config import EAGLE_N15_DEFAULT, GR00TConfig
from models.gr00t.modeling import GR00TPolicyModel
from models.gr00t.prompt import (
    EAGLE25_CHAT_TEMPLATE,
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
    expand_image_placeholders,
    load_prompt_tokenizer,
    read_chat_template,
    upstream_instruction_text,
    upstream_prompt,
    upstream_prompt_ids,
)

ROOT = Path(__file__).resolve().parents[1]
FACTS = json.loads((ROOT / "models" / "fixtures" / "gr00t_n15_eagle_chat_facts.json").read_text())
TINY = ROOT / "models" / "checkpoints" / "gr00t-n1.5-tiny-libero-spatial"
INSTRUCTION = "pick up the black bowl and place it on the plate"


def _n15_tokens_per_image() -> int:
    """The project's ``GR00TPolicyModel.tokens_per_image`` for the released (default) config, without building
    the 3B model: the two properties only read ``config``."""
    ns = SimpleNamespace(config=GR00TConfig())
    ns.image_size = GR00TPolicyModel.image_size.fget(ns)
    return GR00TPolicyModel.tokens_per_image.fget(ns)


def _reference_prompt(instruction_text: str, num_images: int) -> str:
    """What upstream builds, from the fixture's facts only."""
    call = FACTS["apply_chat_template_call"]
    exp = FACTS["processor_expansion"]
    content = [{"type": "image", "image": f"frame{i}.png"} for i in range(num_images)]
    content.append({"type": "text", "text": instruction_text})
    kwargs = {} if call["add_vision_id"] is None else {"add_vision_id": call["add_vision_id"]}
    rendered, _ = render_jinja_template(
        conversations=[[{"role": "user", "content": content}]],
        chat_template=FACTS["chat_template"]["text"],
        add_generation_prompt=call["add_generation_prompt"],
        **kwargs,
    )
    n_ctx = exp["num_tiles_for_one_224x224_image"] * exp["tokens_per_tile"]

    def repl(m: re.Match[str]) -> str:
        assert m.group(1) == "image"
        label = exp["literal_image_label"].format(k=int(m.group(2)))
        return label + exp["image_start_token"] + exp["image_token"] * n_ctx + exp["image_end_token"]

    return re.sub(exp["placeholder_pattern"], repl, rendered[0])


def test_template_is_the_released_chat_template_json_character_for_character() -> None:
    assert EAGLE25_CHAT_TEMPLATE == FACTS["chat_template"]["text"]
    assert read_chat_template(None) == FACTS["chat_template"]["text"]
    assert read_chat_template(TINY) == FACTS["chat_template"]["text"]  # tiny ships no processor template


def test_released_chat_template_json_layout_is_read(tmp_path: Path) -> None:
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": FACTS["chat_template"]["text"]}))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ 'qwen3 text template' }}"}))
    assert read_chat_template(tmp_path) == EAGLE25_CHAT_TEMPLATE


def test_rendered_chat_has_the_released_system_turn_and_image_placeholder() -> None:
    rendered, _ = render_jinja_template(
        conversations=[[{"role": "user", "content": [{"type": "image", "image": "f.png"},
                                                     {"type": "text", "text": "t"}]}]],
        chat_template=FACTS["chat_template"]["text"], add_generation_prompt=True)
    system = FACTS["chat_template"]["default_system_message"]
    assert rendered[0] == f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n<image-1>t<|im_end|>\n" \
                          "<|im_start|>assistant\n"


@pytest.mark.parametrize("num_images", [1, 2])
def test_project_prompt_equals_the_released_template_and_expansion(num_images: int) -> None:
    n_tok = _n15_tokens_per_image()
    assert n_tok == FACTS["processor_expansion"]["tokens_per_tile"] == FACTS["eagle_config"]["num_image_token"]
    got = upstream_prompt(INSTRUCTION, num_images=num_images, tokens_per_image=n_tok)
    want = _reference_prompt(upstream_instruction_text(INSTRUCTION), num_images)
    assert got == want
    if num_images == 1:  # the exact 1-image text, spelled out
        system = FACTS["chat_template"]["default_system_message"]
        assert got == (
            f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n"
            f"<image 1><img>{IMG_CONTEXT * 256}</img>{upstream_instruction_text(INSTRUCTION)}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )


def test_token_sequence_around_the_image_matches_the_processor_expansion() -> None:
    tok, template = load_prompt_tokenizer(TINY)
    n_tok = _n15_tokens_per_image()
    ids = upstream_prompt_ids(tok, INSTRUCTION, 1, n_tok, template)
    assert ids == tok.encode(_reference_prompt(upstream_instruction_text(INSTRUCTION), 1)).ids
    start, end, ctx = (tok.token_to_id(t) for t in (IMG_START, IMG_END, IMG_CONTEXT))
    assert None not in (start, end, ctx)
    i = ids.index(start)
    assert ids[i + 1: i + 1 + n_tok] == [ctx] * n_tok and ids[i + 1 + n_tok] == end
    assert ids.count(ctx) == n_tok and ids.count(start) == ids.count(end) == 1
    label = tok.encode(FACTS["processor_expansion"]["literal_image_label"].format(k=1)).ids
    assert ids[i - len(label): i] == label  # the plain-text "<image 1>" right before <img>
    system_turn = "<|im_start|>system\n" + FACTS["chat_template"]["default_system_message"] + "<|im_end|>\n"
    head = tok.encode(system_turn + "<|im_start|>user\n").ids
    assert ids[:i] == head + label  # system turn, user header, label, then the image block


def test_bundled_eagle_config_and_special_tokens_match_the_release() -> None:
    facts = FACTS["eagle_config"]
    for key in ("select_layer", "force_image_size", "use_pixel_shuffle", "mlp_connector_layers", "image_token_index"):
        assert EAGLE_N15_DEFAULT[key] == facts[key], key
    for sub in ("text_config", "vision_config"):
        for key, value in facts[sub].items():
            assert EAGLE_N15_DEFAULT[sub][key] == value, f"{sub}.{key}"
    special = FACTS["special_tokens"]
    assert special[IMG_CONTEXT] == EAGLE_N15_DEFAULT["image_token_index"]
    assert special["<|endoftext|>"] == EAGLE_N15_DEFAULT["text_config"]["bos_token_id"]
    assert special["<|im_end|>"] == EAGLE_N15_DEFAULT["text_config"]["eos_token_id"]
    assert FACTS["processor_expansion"]["image_start_token"] == IMG_START
    assert FACTS["processor_expansion"]["image_end_token"] == IMG_END
    assert FACTS["processor_expansion"]["image_token"] == IMG_CONTEXT


@pytest.mark.parametrize("instruction_text", ["list_repr", "plain"])
def test_instruction_text_item_matches_upstream_per_commit(instruction_text: str) -> None:
    """The text item upstream's template receives: the list repr (get_action since 267e2dc, the LIBERO harness's
    numbers) or the bare instruction (training; get_action at the release commit). Checked against the rendered
    template output the fixture records for each."""
    facts = FACTS["language_text"]
    modes = {c["text_item"] for c in facts["per_commit"].values()}
    assert modes == {"list_repr", "plain"}
    last = facts["per_commit"][FACTS["source"]["unchanged_through"].split()[0]]
    assert last["text_item"] == "list_repr"  # the default follows upstream's newest N1.5 inference
    ex = facts["example"]
    rendered = render_chat_template_from_facts(upstream_instruction_text(ex["instruction"], instruction_text),
                                               ex["num_images"])
    assert rendered == ex[f"{instruction_text}_template_output"]
    # the project's whole prompt = that rendering + the processor expansion
    got = upstream_prompt(ex["instruction"], ex["num_images"], 4, instruction_text=instruction_text)
    assert got == expand_image_placeholders(ex[f"{instruction_text}_template_output"], 4)


def render_chat_template_from_facts(text: str, num_images: int) -> str:
    content = [{"type": "image", "image": f"frame{i}.png"} for i in range(num_images)]
    rendered, _ = render_jinja_template(conversations=[[{"role": "user", "content": [*content,
                                                                                     {"type": "text", "text": text}]}]],
                                        chat_template=FACTS["chat_template"]["text"], add_generation_prompt=True)
    return rendered[0]


def test_instruction_text_is_a_model_setting_with_a_checked_value() -> None:
    with pytest.raises(ValueError, match="instruction_text"):
        upstream_instruction_text("x", "lower")
    tok, template = load_prompt_tokenizer(TINY)
    plain = upstream_prompt_ids(tok, INSTRUCTION, 1, 4, template, instruction_text="plain")
    listed = upstream_prompt_ids(tok, INSTRUCTION, 1, 4, template)
    assert listed != plain
    assert f"['{INSTRUCTION}']<|im_end|>" in tok.decode(listed, skip_special_tokens=False)
    assert "['" not in tok.decode(plain, skip_special_tokens=False)
