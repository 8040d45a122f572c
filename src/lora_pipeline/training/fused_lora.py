"""A faster forward for peft's plain LoRA linear layers: the adapter's product is added inside one matmul.

peft computes `base(x) + lora_B(lora_A(x)) * scaling`: the low-rank product, then a multiply and an add over
the whole (tokens x out_features) output, each a pass over memory, and as many again in the backward. On CPU
those elementwise passes cost about as much as a fifth of the matmuls in a small model. Here the last step is
one `addmm(base(x), lora_A(x), B^T, alpha=scaling)`: the same sum, one pass, and autograd's addmm backward
gives the same gradients (a test compares outputs and gradients with peft's forward).

LoRA dropout is done here too, and cheaper: peft's `nn.Dropout` draws a Bernoulli mask, multiplies, and scales
by 1/(1-p) (on CPU the mask alone took 20% of the demo's training loop). Here each input feature of each token is
kept with probability 1-p, independently per module and call, as in peft; the mask is applied with one multiply
and the 1/(1-p) goes into the addmm's alpha. p is applied in steps of 1/32768 (0.1 drops 3277/32768), and the
scale is the exact kept share, so the adapter's expected input is unchanged.
On CPU the mask is 15 random bits per element cut from 64-bit draws: torch's CPU generator (a serial Mersenne
twister) makes a 64-bit word in about the time of one float, so this draws a quarter as often as `rand_like`:
mask and multiply were 1.9-2.8x cheaper on the demo model's shapes. Elsewhere it is `rand_like(x) >= p`.
Both use torch's generator, so a run is reproducible from its seed (and resumes with the Trainer's saved RNG
state), but the masks are not mask-for-mask the same as peft's.

Only the plain case is replaced, checked on every call: one active adapter, no DoRA or other variant, not
merged, matching dtypes. Anything else goes through peft's own forward unchanged.
"""

from __future__ import annotations

import types
from typing import Any


def fuse_lora_linears(model: Any) -> int:
    """Give every plain peft `lora.Linear` of `model` the fused forward; returns how many got it."""
    from peft.tuners.lora.layer import Linear

    count = 0
    for module in model.modules():
        if type(module) is Linear:  # subclasses (bitsandbytes, ...) compute differently: left alone
            module.forward = types.MethodType(_fused_forward, module)
            count += 1
    return count


def _fused_forward(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
    import torch

    plain = not args and not kwargs and not self.disable_adapters and not self.merged
    name = self.active_adapters[0] if plain and len(self.active_adapters) == 1 else None
    if name is None or name not in self.lora_A or name in self.lora_variant:
        return type(self).forward(self, x, *args, **kwargs)
    keep = _kept_share(self.lora_dropout[name])
    if keep is None:
        return type(self).forward(self, x, *args, **kwargs)
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    result = self.base_layer(x)
    if x.dtype != a.dtype or result.dtype != b.dtype:
        return type(self).forward(self, x)
    kept = x if keep == 1.0 else x * _keep_mask(x, keep)
    low_rank = torch.nn.functional.linear(kept, a)
    out = torch.addmm(
        result.reshape(-1, result.shape[-1]),
        low_rank.reshape(-1, low_rank.shape[-1]),
        b.t(),
        alpha=self.scaling[name] / keep,
    )
    return out.view(result.shape)


_STEPS = 1 << 15  # p is applied as a multiple of 1/_STEPS: 15 random bits per element


def _kept_share(dropout: Any) -> float | None:
    """The share of input features the adapter sees: 1.0 without dropout (or in eval mode), 1 - p with it (p
    rounded to a multiple of 1/32768); None for a module this path does not know."""
    import torch

    if isinstance(dropout, torch.nn.Identity):
        return 1.0
    if type(dropout) is torch.nn.Dropout and 0.0 <= dropout.p < 1.0:
        dropped = min(round(dropout.p * _STEPS), _STEPS - 1) if dropout.training else 0
        return (_STEPS - dropped) / _STEPS
    return None


def _keep_mask(x: Any, keep: float) -> Any:
    """A bool mask shaped like `x`: each element True with probability `keep` (a multiple of 1/32768)."""
    import torch

    dropped = _STEPS - round(keep * _STEPS)
    if x.device.type != "cpu":
        return torch.rand_like(x) >= dropped / _STEPS
    # four 16-bit draws per 64-bit word; random_() leaves the word's top bit 0, so each keeps its low 15 bits
    n = x.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64).random_()
    return (words.view(torch.int16)[:n].view(x.shape) & (_STEPS - 1)) >= dropped
