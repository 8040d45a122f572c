"""`lora-pipeline chat -o RUN`: talk to the trained adapter on a terminal, or `--prompt TEXT` for one answer.

The model is loaded as eval loads it: the base the adapter records, quantized as train/metrics.json says it
was trained, the adapter on top (unmerged), and the adapter's own tokenizer, so the chat template is the one
used in training. Tokens are streamed to the output as they are generated.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import IO, Any

from lora_pipeline.errors import ConfigError
from lora_pipeline.files import read_json
from lora_pipeline.models import adapter_base, load_base_model, load_tokenizer
from lora_pipeline.stages.outputs import ADAPTER, METRICS

EXIT_WORDS = ("/exit", "/quit")
# Beyond these an answer is noise: temperature 100 is uniform sampling; 32768 tokens is past the context of
# the models this pipeline tunes, and an unbounded count generated for hours on a model without a limit.
MAX_TEMPERATURE = 100.0
MAX_NEW_TOKENS = 32768


def find_adapter(run_dir: Path | None) -> tuple[Path, dict[str, Any]]:
    """The adapter directory of a run directory (or of a train stage's output) and the train stage's metrics."""
    if run_dir is None:
        raise ConfigError("required: the run directory whose adapter to load (-o RUN)", field="-o")
    # a run directory, a train output, or the adapter directory itself (its train output's metrics beside it)
    for train_dir, adapter in (
        (run_dir / "train", run_dir / "train" / ADAPTER),
        (run_dir, run_dir / ADAPTER),
        (run_dir.parent, run_dir),
    ):
        if (adapter / "adapter_config.json").is_file():
            metrics = train_dir / METRICS
            return adapter.resolve(), (read_json(metrics) if metrics.is_file() else {})
    raise ConfigError(f"no adapter in {run_dir / 'train' / 'adapter'}: run the train stage first", field="-o")


class Chat:
    """Base + adapter + tokenizer, and the conversation so far."""

    def __init__(self, run_dir: Path | None, system: str = "") -> None:
        adapter, trained = find_adapter(run_dir)
        base_ref = adapter_base(adapter, field="-o")
        quant = trained.get("quantization")
        trust_remote_code = bool(trained.get("trust_remote_code", False))
        if quant and importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(
                "the adapter was trained on a quantized base; loading it as trained needs bitsandbytes "
                "(pip install bitsandbytes)",
                field="-o",
            )
        from peft import PeftModel

        from lora_pipeline.tokenization import ensure_chat_template, stop_token_ids

        self.tokenizer = load_tokenizer(str(adapter), trust_remote_code, field="-o")
        ensure_chat_template(self.tokenizer)  # an adapter saved without one was trained on ChatML
        base = load_base_model(base_ref, quant, trust_remote_code, field="-o")
        self.model = PeftModel.from_pretrained(base, str(adapter)).eval()
        self.stops = stop_token_ids(self.tokenizer)
        self.system = system
        self.history: list[dict[str, str]] = []

    def prompt_ids(self, text: str) -> Any:
        """The conversation so far plus the user's `text`, rendered for the assistant's next turn."""
        from lora_pipeline.tokenization import render_chat

        messages = [{"role": "system", "content": self.system}] if self.system else []
        messages += [*self.history, {"role": "user", "content": text}]
        rendered = render_chat(self.tokenizer, messages, add_generation_prompt=True)
        return self.tokenizer(rendered, add_special_tokens=False, return_tensors="pt")["input_ids"]

    def answer(self, text: str, out: IO[str], max_new_tokens: int, temperature: float) -> str:
        """Generate the answer to `text`, streaming it to `out`; it joins the history."""
        import torch

        ids = self.prompt_ids(text).to(self.model.device)
        streamer = make_streamer(self.tokenizer, out)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.stops[0]
        with torch.no_grad():
            output = self.model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                eos_token_id=self.stops,
                pad_token_id=pad,
                streamer=streamer,
                **sampling,
            )
        reply = self.tokenizer.decode(output[0, ids.shape[1] :], skip_special_tokens=True)
        out.write("\n")
        out.flush()
        self.history += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        return reply


def make_streamer(tokenizer: Any, out: IO[str]) -> Any:
    """transformers' TextStreamer, writing to `out` (it prints to stdout) without the prompt or special tokens."""
    from transformers import TextStreamer

    class Streamer(TextStreamer):
        def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
            out.write(text)
            out.flush()

    return Streamer(tokenizer, skip_prompt=True, skip_special_tokens=True)


def chat_command(
    run_dir: Path | None,
    prompt: str | None,
    max_new_tokens: int,
    temperature: float,
    system: str = "",
    stdin: IO[str] | None = None,
    out: IO[str] | None = None,
) -> int:
    """One answer to `prompt`, or a conversation read line by line from `stdin` until `/exit` or EOF."""
    if max_new_tokens < 1:
        raise ConfigError(f"must be at least 1, got {max_new_tokens}", field="--max_new_tokens")
    if not 0 <= temperature <= MAX_TEMPERATURE:  # also refuses nan and inf (a division by it: no sampling at all)
        raise ConfigError(f"must be 0 (greedy) to {MAX_TEMPERATURE:g}, got {temperature}", field="--temperature")
    if max_new_tokens > MAX_NEW_TOKENS:
        raise ConfigError(f"must be at most {MAX_NEW_TOKENS}, got {max_new_tokens}", field="--max_new_tokens")
    stdin, out = stdin or sys.stdin, out or sys.stdout
    chat = Chat(run_dir, system)
    if prompt is not None:
        chat.answer(prompt, out, max_new_tokens, temperature)
        return 0
    interactive = stdin.isatty()
    if interactive:
        sys.stderr.write("chat: type a message; /reset clears the conversation, /exit or Ctrl-D ends\n")
    while True:
        if interactive:
            out.write("> ")
            out.flush()
        line = stdin.readline()
        if not line:  # EOF
            break
        text = line.strip()
        if text in EXIT_WORDS:
            break
        if text == "/reset":
            chat.history.clear()
            continue
        if text:
            chat.answer(text, out, max_new_tokens, temperature)
    return 0
