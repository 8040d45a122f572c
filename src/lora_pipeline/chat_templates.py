"""`train.chat_template`: a built-in chat template by name, or a Jinja file, for a base model without one.

The chosen template is set on the tokenizer before any row is rendered, so it is the one the encoded-data
cache key hashes, the one saved with the adapter's tokenizer (adapter/chat_template.jinja), and so the one
that eval, `chat` and a merged export read back. A base model without a template and no option is an error
that names the option (rendering would otherwise fall back to some format silently).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lora_pipeline.errors import ConfigError
from lora_pipeline.files import sha256_file

FIELD = "train.chat_template"

# Each renders the assistant's answer followed by its end-of-turn marker, which tokenization trains on.
BUILTIN_TEMPLATES: dict[str, str] = {
    # Qwen's ChatML.
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    # Llama 3 / 3.1 instruct (header ids and <|eot_id|>), without the tool-calling parts.
    "llama3": (
        "{{ bos_token or '' }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
    # Mistral / Llama 2 instruct: [INST] question [/INST] answer</s>; a system message leads the first turn.
    "mistral": (
        "{{ bos_token or '' }}{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
        "{% elif message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] + (eos_token or '') }}{% endif %}"
        "{% endfor %}"
    ),
    # Zephyr (HuggingFaceH4): <|role|> lines, each turn closed by the EOS token.
    "zephyr": (
        "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\n' + message['content'] + (eos_token or '') + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    ),
}

_PROBE = [
    {"role": "system", "content": "PROBE-SYSTEM"},
    {"role": "user", "content": "PROBE-USER"},
    {"role": "assistant", "content": "PROBE-ANSWER"},
]


def resolve_template(value: str) -> str:
    """The template text `value` names: a built-in name, else a Jinja file's contents; checked to render a
    conversation with the answer in it. Any failure is one ConfigError naming the option."""
    name = value.strip()
    if name.lower() in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name.lower()]
    path = Path(name).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"{value!r} is neither a built-in template ({', '.join(BUILTIN_TEMPLATES)}) nor a Jinja file", field=FIELD
        )
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}", field=FIELD) from None
    if not text.strip():
        raise ConfigError(f"{path} is empty", field=FIELD)
    check_renders(text, str(path))
    return text


def template_fingerprint(value: str) -> str | None:
    """A template file's text digest (None for a built-in name, or a file that is not there)."""
    path = Path(value.strip()).expanduser()
    if value.strip().lower() in BUILTIN_TEMPLATES or not path.is_file():
        return None
    return sha256_file(path)


def check_renders(template: str, where: str) -> None:
    """The template compiles and renders a system/user/assistant conversation with the answer in the text."""
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        rendered = render_jinja_template(
            conversations=[_PROBE], chat_template=template, bos_token="<s>", eos_token="</s>"
        )[0][0]
    except Exception as exc:  # jinja2's syntax/undefined errors and whatever the template raises
        detail = (str(exc).strip().splitlines() or [""])[0]
        why = f"{type(exc).__name__}: {detail}"
        raise ConfigError(f"the template in {where} fails to render: {why}", field=FIELD) from None
    if "PROBE-ANSWER" not in rendered or "PROBE-USER" not in rendered:
        raise ConfigError(f"the template in {where} does not render the messages' content", field=FIELD)


def apply_chat_template_option(tokenizer: Any, value: str) -> None:
    """Set the chosen template on `tokenizer` (it replaces the model's own, if any); a pad token defaults to EOS.
    A tokenizer left without a template fails where a conversation is rendered (tokenization.render_chat)."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if value:
        tokenizer.chat_template = resolve_template(value)


def has_own_template(model_dir: Path) -> bool:
    """Whether a saved tokenizer carries a chat template, read from its files (no tokenizer loaded)."""
    if (model_dir / "chat_template.jinja").is_file() or (model_dir / "chat_template.json").is_file():
        return True
    if (model_dir / "additional_chat_templates").is_dir():
        return True
    config = model_dir / "tokenizer_config.json"
    try:
        return bool(json.loads(config.read_text(encoding="utf-8")).get("chat_template")) if config.is_file() else False
    except (OSError, ValueError, AttributeError):
        return True  # unreadable here: the tokenizer check reports it, and rendering would name the template


def check_chat_template(template: str, model: str, model_dir: Path | None, data_format: str) -> None:
    """Pre-flight: a given template resolves and renders; without one, a chat dataset on a local (or cached)
    base model without a template is refused here rather than after the dataset stage. `auto` data may be
    plain text, which needs no template: it is left to the train stage."""
    if template:
        resolve_template(template)
    elif model_dir is not None and data_format not in ("auto", "text") and not has_own_template(model_dir):
        raise ConfigError(no_template_message(model), field=FIELD)


def no_template_message(model: str) -> str:
    return (
        f"the base model {model} has no chat template: choose one with --train.chat_template "
        f"{'|'.join(BUILTIN_TEMPLATES)} or a Jinja file (or train on plain text with --dataset.format text)"
    )
