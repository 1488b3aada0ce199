"""GR00T N1.5 text prompts: the upstream Eagle 2.5 chat prompt and the project's legacy prompt.

Why two formats: a released GR00T N1.5 checkpoint was trained on the prompt upstream's ``GR00TTransform`` and
Eagle 2.5 processor build, so serving it needs exactly that prompt. The project's shipped tiny GR00T was
trained on an older, simpler prompt; changing its prompt would silently change its actions. Which one a
checkpoint uses is declared by ``config.json``'s top-level ``prompt_format`` key (absent => upstream).

Upstream prompt (facts from Isaac-GR00T ``gr00t/model/{transforms,policy}.py`` and
``backbone/eagle2_hg_model/{chat_template.json,processing_eagle2_5_vl.py}``, recorded with their commits in
``models/fixtures/gr00t_n15_eagle_chat_facts.json``):

1. the instruction text (``instruction_text``): upstream's *inference* path renders the language annotation as a
   Python list repr, ``"['pick up the bowl']"`` (``list_repr``, the default): from commit 267e2dc (#292) through
   the last N1.5 commit 4af2b62, ``Gr00tPolicy`` batches a one-element list into a (1, 1) numpy array, the
   transform only unwraps lists, and the chat template prints the array. Upstream's *training* path, and
   ``get_action`` at the N1.5 release commit 5e3ef5e, give the plain instruction (``plain``). The LIBERO example
   harness arrived after 267e2dc, so its published numbers were measured with ``list_repr``; ``plain`` is offered for
   checkpoints served as they were trained (``--policy-option instruction_text=plain``);
2. one user message, content = one image item per view, then the text; rendered with the Eagle 2.5 chat
   template (``add_generation_prompt=True``), which writes a default system turn and ``<image-k>`` per image;
3. the processor replaces each ``<image-k>`` by the literal text ``<image k>`` followed by
   ``<img>`` + ``<IMG_CONTEXT>`` x tokens-per-image + ``</img>``;
4. the result is tokenized as plain text (the special tokens are atomic added tokens).

Legacy prompt (``project_v0``): ``<|im_start|>user\\n`` + per view ``<img>`` ``<IMG_CONTEXT>`` x n ``</img>`` +
instruction + ``<|im_end|>\\n<|im_start|>assistant\\n``, tokenized piecewise.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer

from models.common.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)

PROMPT_FORMAT_KEY = "prompt_format"
PROMPT_UPSTREAM = "eagle2.5_chat"
PROMPT_LEGACY = "project_v0"
PROMPT_FORMATS = (PROMPT_UPSTREAM, PROMPT_LEGACY)

IMG_CONTEXT, IMG_START, IMG_END = "<IMG_CONTEXT>", "<img>", "</img>"

# The Eagle 2.5 chat template (Qwen chat markup; images become ``<image-k>`` placeholders for the processor):
# character-for-character the ``chat_template`` of N1.5's ``eagle2_hg_model/chat_template.json`` (see the fixture).
EAGLE25_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}<image {{ image_count.value }}>"
    "{% endif %}<image-{{ image_count.value }}>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}<video {{ video_count.value }}>"
    "{% endif %}<video-{{ video_count.value }}>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_PLACEHOLDER = re.compile(r"<image-(\d+)>")


def read_chat_template(tokenizer_dir: str | os.PathLike[str] | None) -> str:
    """The processor chat template a released-layout directory ships (``chat_template.json``, then a raw
    ``chat_template.jinja``, then ``processor_config.json``'s key), else :data:`EAGLE25_CHAT_TEMPLATE` (what
    GR00T N1.5 bundles).

    ``tokenizer_config.json`` is deliberately not read: upstream renders with the Eagle *processor*'s
    ``apply_chat_template``, which never uses the tokenizer's template, and N1.5's tokenizer_config.json carries
    Qwen3's text-only template (it cannot render image items)."""
    if tokenizer_dir is not None:
        root = Path(tokenizer_dir)
        for name in ("chat_template.json", "chat_template.jinja", "processor_config.json"):
            f = root / name
            if f.is_file():
                text = f.read_text()
                template = text if name.endswith(".jinja") else json.loads(text).get("chat_template")
                if isinstance(template, str) and template:
                    return template
    return EAGLE25_CHAT_TEMPLATE


INSTRUCTION_LIST_REPR = "list_repr"
INSTRUCTION_PLAIN = "plain"
INSTRUCTION_TEXTS = (INSTRUCTION_LIST_REPR, INSTRUCTION_PLAIN)


def upstream_instruction_text(instruction: str, instruction_text: str = INSTRUCTION_LIST_REPR) -> str:
    """The text item of the user turn: the repr of a one-element list (upstream inference since 267e2dc) or the
    instruction itself (upstream training; inference at 5e3ef5e). See the module docstring."""
    if instruction_text == INSTRUCTION_LIST_REPR:
        return str([instruction])
    if instruction_text == INSTRUCTION_PLAIN:
        return instruction
    raise ValueError(f"instruction_text must be one of {INSTRUCTION_TEXTS}, got {instruction_text!r}")


@functools.lru_cache(maxsize=16)
def _compiled(template: str) -> Any:
    """The template compiled once: compiling costs ~35 ms, rendering a compiled one ~0.1 ms (measured on the
    Eagle 2.5 template; compiling per observation was 1/3 of a tiny GR00T's training step)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    return env.from_string(template)


def render_chat(template: str, text: str, num_images: int) -> str:
    """Render one user turn (``num_images`` image items, then ``text``) the way HF ``apply_chat_template`` does."""
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]
    return _compiled(template).render(messages=[{"role": "user", "content": content}],
                                      add_generation_prompt=True, add_vision_id=False)


def expand_image_placeholders(text: str, tokens_per_image: int) -> str:
    """The Eagle 2.5 processor step: ``<image-k>`` -> ``<image k><img><IMG_CONTEXT>...</img>`` (one tile each)."""
    block = IMG_START + IMG_CONTEXT * tokens_per_image + IMG_END
    return _PLACEHOLDER.sub(lambda m: f"<image {int(m.group(1))}>{block}", text)


def upstream_prompt(instruction: str, num_images: int, tokens_per_image: int,
                    template: str = EAGLE25_CHAT_TEMPLATE, instruction_text: str = INSTRUCTION_LIST_REPR) -> str:
    """The full upstream prompt text for one observation."""
    chat = render_chat(template, upstream_instruction_text(instruction, instruction_text), num_images)
    return expand_image_placeholders(chat, tokens_per_image)


def upstream_prompt_ids(tokenizer: Tokenizer, instruction: str, num_images: int, tokens_per_image: int,
                        template: str = EAGLE25_CHAT_TEMPLATE, image_token_id: int | None = None,
                        instruction_text: str = INSTRUCTION_LIST_REPR) -> list[int]:
    """Token ids of :func:`upstream_prompt`; checks that exactly ``num_images * tokens_per_image`` ids are the
    image-context token (a tokenizer without an atomic ``<IMG_CONTEXT>`` would silently break the scatter)."""
    ids = tokenizer.encode(upstream_prompt(instruction, num_images, tokens_per_image, template,
                                           instruction_text)).ids
    ctx = tokenizer.token_to_id(IMG_CONTEXT) if image_token_id is None else image_token_id
    n = sum(1 for i in ids if i == ctx)
    if n != num_images * tokens_per_image:
        raise ValueError(f"prompt has {n} image-context tokens, expected {num_images * tokens_per_image}")
    return ids


def legacy_prompt_ids(tokenizer: Tokenizer, instruction: str, num_images: int, tokens_per_image: int,
                      image_token_id: int) -> list[int]:
    """The project's ``project_v0`` prompt (what the shipped tiny GR00T was trained on)."""
    def special(token: str) -> int:
        tid = tokenizer.token_to_id(token)
        if tid is None:
            raise ValueError(f"tokenizer lacks special token {token!r}")
        return tid

    enc = tokenizer.encode
    head = enc("<|im_start|>user\n", add_special_tokens=False).ids
    tail = enc("<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).ids
    img = [special(IMG_START)] + [image_token_id] * tokens_per_image + [special(IMG_END)]
    return head + img * num_images + enc(instruction, add_special_tokens=False).ids + tail


def load_prompt_tokenizer(tokenizer_dir: str | os.PathLike[str]) -> tuple[Tokenizer, str]:
    """``tokenizer.json`` and the chat template of a released-layout directory."""
    return load_tokenizer(Path(tokenizer_dir)), read_chat_template(tokenizer_dir)
