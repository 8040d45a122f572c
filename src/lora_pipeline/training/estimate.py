"""Before training: the expected peak memory; after a few steps: the expected time. During: the real peaks.

The memory estimate adds up what training holds at its peak, from the model as loaded and wrapped:
  weights      every parameter and buffer at its stored size (4-bit weights count their packed bytes)
  lora         the trainable parameters, their gradients, and AdamW's two states per parameter (fp32)
  activations  what one forward pass keeps for its backward, at the token budget of a pass:
               tokens x layers x 5 x (hidden + intermediate) elements, plus the logits (tokens x vocab, fp32,
               twice: the logits and their log-softmax). The 5 is measured: the tensors autograd saves for
               a 2048-token pass (counted by storage with saved-tensor hooks) were 4.5 x (hidden + intermediate)
               per token and layer for the demo's Qwen2 (128/384) and 4.95 x for a 256/768 one. The backward
               holds gradients and temporaries beside them: x 1.75 (the peak RSS of training that 256/768
               model grew by 1.74 x the saved tensors' size between 1k- and 4k-token passes).
It does not count the process itself (Python, torch's libraries: a few hundred MB on CPU) or allocator slack.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

ACTIVATION_ELEMENTS_PER_UNIT = 5.0  # per token, per layer, per (hidden_size + intermediate_size); see above
BACKWARD_WORKING_SET = 1.75  # peak activation memory / what autograd saves; see above


def estimate_memory(model: Any, pass_tokens: int, target_tokens: int | None = None) -> dict[str, int]:
    """Bytes by part (see the module docstring) for a pass of `pass_tokens` tokens, of which `target_tokens`
    (default: all) get logits."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    lora = sum(p.numel() * p.element_size() for p in trainable)
    config = model.config
    hidden = getattr(config, "hidden_size", 0)
    inner = getattr(config, "intermediate_size", 0) or 4 * hidden
    layers = getattr(config, "num_hidden_layers", 0)
    element = _activation_bytes(trainable)
    per_token = ACTIVATION_ELEMENTS_PER_UNIT * (hidden + inner) * layers * element
    logits = (pass_tokens if target_tokens is None else target_tokens) * getattr(config, "vocab_size", 0) * 4 * 2
    parts = {
        "weights": frozen + buffers,
        "lora": lora,
        "gradients": lora,
        "optimizer": 2 * sum(p.numel() for p in trainable) * 4,
        "activations": int((pass_tokens * per_token + logits) * BACKWARD_WORKING_SET),
    }
    parts["total"] = sum(parts.values())
    return parts


def _activation_bytes(trainable: list[Any]) -> int:
    import torch

    # Activations follow the compute dtype: on CUDA the base is bf16/fp16 and training runs under autocast, so
    # they are 2 bytes even though peft keeps the LoRA weights in fp32; on CPU, the LoRA weights' dtype.
    if torch.cuda.is_available():
        return 2
    dtype = trainable[0].dtype if trainable else torch.float32
    return torch.finfo(dtype).bits // 8


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def describe(estimate: dict[str, int], pass_tokens: int) -> str:
    trainable = estimate["lora"] + estimate["gradients"] + estimate["optimizer"]
    return (
        f"expected peak memory ~{format_bytes(estimate['total'])} (weights {format_bytes(estimate['weights'])}, "
        f"LoRA + gradients + optimizer {format_bytes(trainable)}, activations {format_bytes(estimate['activations'])}"
        f" at {pass_tokens} tokens/pass)"
    )


class PeakMemory:
    """The process's peak resident memory while training, and CUDA's max allocated.

    On Linux the kernel keeps the peak itself (VmHWM); it is reset at the start (/proc/self/clear_refs), so the
    peak is exact and costs nothing while training runs. Elsewhere a daemon thread samples the RSS every
    `interval` s (a peak between two optimizer steps would be missed by a per-step reading)."""

    def __init__(self, interval: float = 0.05) -> None:
        import torch

        self._cuda = torch.cuda.is_available()
        if self._cuda:
            torch.cuda.reset_peak_memory_stats()
        self.rss_start = self.rss_peak = current_rss()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if not _reset_kernel_peak():
            self._thread = threading.Thread(target=self._sample, args=(interval,), name="peak-memory", daemon=True)
            self._thread.start()

    def _sample(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.rss_peak = max(self.rss_peak, current_rss())

    def stop(self) -> dict[str, int | None]:
        if self._thread is None:
            self.rss_peak = max(self.rss_peak, kernel_peak_rss() or 0)
        else:
            self._stop.set()
            self._thread.join()
        self.rss_peak = max(self.rss_peak, current_rss())
        return self.as_dict()

    def as_dict(self) -> dict[str, int | None]:
        import torch

        return {
            "rss_start_bytes": self.rss_start,
            "rss_peak_bytes": self.rss_peak,
            "rss_peak_increase_bytes": self.rss_peak - self.rss_start,
            "cuda_max_allocated_bytes": torch.cuda.max_memory_allocated() if self._cuda else None,
        }


def current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def kernel_peak_rss() -> int | None:
    """This process's peak RSS since it started or since the last reset (Linux's VmHWM), in bytes; None
    elsewhere. Unlike ru_maxrss it is not inherited from the parent of an exec'd child."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _reset_kernel_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # 5: reset the peak RSS (VmHWM) to the current RSS
    except OSError:
        return False
    return kernel_peak_rss() is not None


def make_eta_callback(total_steps: int, log: logging.Logger, after_steps: int = 10) -> Any:
    """A TrainerCallback that times `after_steps` optimizer steps after the run's first one (a resumed run
    counts from where it starts), then logs the expected time to finish and keeps the prediction for
    metrics.json (`as_dict`). Per-epoch evaluations are not in the steps it times."""
    from transformers import TrainerCallback

    from lora_pipeline.progress import format_eta

    class EtaCallback(TrainerCallback):
        def __init__(self) -> None:
            self.started = 0.0
            self.first_step = 0
            self.mark: tuple[float, int] | None = None  # (time, step) at the end of the run's first step
            self.predicted: float | None = None
            self.measured_steps = 0

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started, self.first_step = time.perf_counter(), state.global_step

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            now = time.perf_counter()
            if self.mark is None:
                # The first step carries one-off costs (allocations, lazy setup): the rate is timed after it.
                self.mark = (now, state.global_step)
                return
            done = state.global_step - self.mark[1]
            if self.predicted is not None or done < min(after_steps, total_steps - self.mark[1]):
                return
            remaining = (total_steps - state.global_step) * (now - self.mark[0]) / done
            self.predicted, self.measured_steps = now - self.started + remaining, done
            if state.is_world_process_zero:
                log.info("train: expected time to finish: ~%s (from %d steps)", format_eta(remaining), done)

        def as_dict(self) -> dict[str, Any]:
            seconds = round(self.predicted, 3) if self.predicted is not None else None
            return {"after_steps": self.measured_steps, "predicted_seconds": seconds}

    return EtaCallback()
