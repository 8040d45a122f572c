"""A faster forward for peft's plain LoRA linear layers: the adapter's product is added inside one matmul.

peft computes `base(x) + lora_B(lora_A(x)) * scaling`: the low-rank product, then a multiply and an add over
the whole (tokens x out_features) output, each a pass over memory, and as many again in the backward. On CPU
those elementwise passes cost about as much as a fifth of the matmuls in a small model. Here the last step is
one `addmm(base(x), lora_A(x), B^T, alpha=scaling)`: the same sum, one pass, and autograd's addmm backward
gives the same gradients (a test compares outputs and gradients with peft's forward).

LoRA dropout is done here too, and cheaper: peft's `nn.Dropout` draws a Bernoulli mask, multiplies, and scales
by 1/(1-p) (on CPU the mask alone took 20% of the demo's training loop). Here the mask is `rand >= p` (the same
distribution: each input feature of each token kept with probability 1-p, independently per module and call),
applied with one multiply, and the 1/(1-p) goes into the addmm's alpha. The masks come from another draw than
peft's, so a run is reproducible from its seed but not mask-for-mask the same as peft's.

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
    kept = x if keep == 1.0 else x * (torch.rand_like(x) >= 1.0 - keep)
    low_rank = torch.nn.functional.linear(kept, a)
    out = torch.addmm(
        result.reshape(-1, result.shape[-1]),
        low_rank.reshape(-1, low_rank.shape[-1]),
        b.t(),
        alpha=self.scaling[name] / keep,
    )
    return out.view(result.shape)


def _kept_share(dropout: Any) -> float | None:
    """The share of input features the adapter sees: 1.0 without dropout (or in eval mode), 1 - p with it;
    None for a module this path does not know."""
    import torch

    if isinstance(dropout, torch.nn.Identity):
        return 1.0
    if type(dropout) is torch.nn.Dropout and 0.0 <= dropout.p < 1.0:
        return 1.0 - dropout.p if dropout.training and dropout.p > 0 else 1.0
    return None
