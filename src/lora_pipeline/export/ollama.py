"""The Ollama `Modelfile` written beside an exported GGUF file.

Ollama templates are Go templates, not Jinja. The chat formats most fine-tunes use are recognised by their
marker tokens and written as Ollama's own templates for them (ChatML: Qwen2 and the demo model; Llama 3;
Mistral's [INST]). Any other template gets no TEMPLATE line: Ollama then reads the chat template stored in
the GGUF file itself (tokenizer.chat_template) when it knows it, and the Jinja text is kept as a comment to
convert by hand.
"""

from __future__ import annotations

import json
from typing import Any

CHATML = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)
LLAMA3 = (
    "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
MISTRAL = (
    '{{- range .Messages }}{{ if eq .Role "user" }}[INST] {{ if $.System }}{{ $.System }}\n\n{{ end }}'
    '{{ .Content }} [/INST]{{ else if eq .Role "assistant" }} {{ .Content }}</s>{{ end }}{{ end }}'
)
# (marker in the Jinja template, Go template, the turn's end tokens)
_KNOWN = (
    ("<|im_start|>", CHATML, ("<|im_end|>",)),
    ("<|start_header_id|>", LLAMA3, ("<|eot_id|>",)),
    ("[INST]", MISTRAL, ("</s>",)),
)


def go_template(chat_template: str | None) -> tuple[str | None, tuple[str, ...]]:
    """The Ollama template for a Jinja chat template, and the stop tokens it implies; (None, ()) if unknown."""
    for marker, template, stops in _KNOWN:
        if chat_template and marker in chat_template:
            return template, stops
    return None, ()


def modelfile(tokenizer: Any, gguf_name: str = "model.gguf") -> str:
    """`FROM ./model.gguf`, the TEMPLATE, and one `PARAMETER stop` per end-of-turn token."""
    chat_template = getattr(tokenizer, "chat_template", None)
    chat_template = chat_template if isinstance(chat_template, str) else None
    template, stops = go_template(chat_template)
    lines = [f"FROM ./{gguf_name}", ""]
    if template is not None:
        lines.append(f'TEMPLATE """{template}"""')
    else:
        lines.append("# The chat template is not one this exporter converts to a Go template (ChatML, Llama 3,")
        lines.append("# Mistral): Ollama uses the template stored in the GGUF file if it recognises it.")
        lines += [f"# {line}" for line in (chat_template or "(no chat template)").splitlines()]
    eos = getattr(tokenizer, "eos_token", None)
    for stop in dict.fromkeys([*stops, *([eos] if isinstance(eos, str) else [])]):
        lines.append(f"PARAMETER stop {_quoted(stop)}")
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    """A double-quoted string on one line: JSON's escapes, plus the line separators JSON leaves as they are."""
    quoted = json.dumps(text, ensure_ascii=False)
    return quoted.replace("\x85", "\\u0085").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
