"""A faster forward for peft's plain LoRA linear layers: the adapter's product is added inside one matmul.

peft computes `base(x) + lora_B(lora_A(x)) * scaling`: the low-rank product, then a multiply and an add over
the whole (tokens x out_features) output, each a pass over memory, and as many again in the backward. On CPU
those elementwise passes cost about as much as a fifth of the matmuls in a small model. Here the last step is
one `addmm(base(x), lora_A(x), B^T, alpha=scaling)`: the same sum, one pass, and autograd's addmm backward
gives the same gradients (a test compares outputs and gradients with peft's forward).

Only the plain case is replaced, checked on every call: one active adapter, no dropout (dropout draws a fresh
mask per module, which this path would not), no DoRA or other variant, not merged, matching dtypes. Anything
else goes through peft's own forward unchanged.
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
    if (
        name is None
        or name not in self.lora_A
        or name in self.lora_variant
        or not isinstance(self.lora_dropout[name], torch.nn.Identity)
    ):
        return type(self).forward(self, x, *args, **kwargs)
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    result = self.base_layer(x)
    if x.dtype != a.dtype or result.dtype != b.dtype:
        return type(self).forward(self, x)
    low_rank = torch.nn.functional.linear(x, a)
    out = torch.addmm(
        result.reshape(-1, result.shape[-1]), low_rank.reshape(-1, low_rank.shape[-1]), b.t(), alpha=self.scaling[name]
    )
    return out.view(result.shape)
