"""The fused LoRA forward gives peft's outputs and gradients, and steps aside wherever it does not apply."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from peft import LoraConfig, get_peft_model

from lora_pipeline.training.fused_lora import _keep_mask, _kept_share, fuse_lora_linears


def lora_model(demo_assets, **lora):
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(demo_assets.model_dir, dtype=torch.float32)
    # init_lora_weights=False: B is random too, so the adapter's product is not zero and the test can fail
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, **lora)
    return get_peft_model(base, config)


def outputs_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.logits.detach(), grads


@pytest.mark.integration
@pytest.mark.parametrize("lora", [{}, {"use_rslora": True}])
def test_fused_forward_matches_peft(demo_assets, lora) -> None:
    model = lora_model(demo_assets, **lora)
    ids = torch.randint(5, 700, (2, 33))
    logits, grads = outputs_and_grads(model, ids)
    fused = copy.deepcopy(model)
    assert fuse_lora_linears(fused) == 14  # 7 linear layers x 2 blocks
    fused_logits, fused_grads = outputs_and_grads(fused, ids)
    assert torch.allclose(logits, fused_logits, atol=1e-4, rtol=1e-4)  # the same sum, added in another order
    assert grads.keys() == fused_grads.keys()
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        # float32 sums in another order: equal to a few 1e-6 of the gradient's scale (a wrong term is O(1))
        assert (grad - fused_grads[name]).abs().max() <= 2e-5 * grad.abs().max(), name


def test_dropout_has_peft_dropouts_distribution() -> None:
    """Each fused call draws its own mask: over many calls the output has peft's mean (the no-dropout output:
    the 1/(1-p) scale is right) and peft's spread (the same share of features dropped)."""
    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.3, target_modules=["0"], init_lora_weights=False)
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(32, 48)), config)
    layer, x, n = model.base_model.model[0], torch.randn(64, 32), 400
    with torch.no_grad():
        by_peft = torch.stack([layer(x) for _ in range(n)])
        assert fuse_lora_linears(model) == 1
        fused = torch.stack([layer(x) for _ in range(n)])
        model.eval()
        undropped = layer(x)
        assert torch.equal(layer(x), undropped)  # eval: no dropout, nothing random
    z = (fused.mean(0) - undropped) / (fused.var(0) / n).sqrt()
    assert z.abs().mean() < 1.2 and z.abs().max() < 6  # E|z| is 0.8 for an unbiased mean
    spread = fused.var(0).mean() / by_peft.var(0).mean()
    assert fused.var(0).mean() > 0 and 0.9 < spread < 1.1, spread


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_cpu_dropout_mask_keeps_every_element_at_1_minus_p_independently(p) -> None:
    """The CPU mask is cut from 64-bit draws, four elements per draw, the word's top bit never set: each of the
    four positions must be kept at the same rate 1-p, and two elements of one draw independently."""
    torch.manual_seed(0)
    keep = _kept_share(torch.nn.Dropout(p))
    assert keep == 1 - round(p * 32768) / 32768 and abs(keep - (1 - p)) < 2e-5
    mask = _keep_mask(torch.ones(1000, 4000), keep)
    assert mask.shape == (1000, 4000) and mask.dtype == torch.bool
    by_position = mask.view(-1, 4).double().mean(0)  # 1M draws each: binomial sd <= 5e-4
    assert (by_position - keep).abs().max() < 2.5e-3, by_position
    pairs = mask.view(-1, 4)
    both = (pairs[:, 0] & pairs[:, 3]).double().mean().item()  # lowest and highest 16 bits of one word
    assert abs(both - keep * keep) < 2.5e-3, both
    assert not torch.equal(mask, _keep_mask(torch.ones(1000, 4000), keep))  # a new draw on every call


@pytest.mark.integration
def test_dropout_is_reproducible_and_trains(demo_assets) -> None:
    model = lora_model(demo_assets, lora_dropout=0.1)
    assert fuse_lora_linears(model) == 14
    ids = torch.randint(5, 700, (1, 20))
    torch.manual_seed(1)
    first = outputs_and_grads(model, ids)
    torch.manual_seed(1)
    again = outputs_and_grads(model, ids)
    torch.manual_seed(2)
    other = outputs_and_grads(model, ids)
    assert torch.equal(first[0], again[0]) and not torch.equal(first[0], other[0])
    assert all(g.abs().max() > 0 for g in first[1].values())


@pytest.mark.integration
@pytest.mark.parametrize("lora", [{"use_dora": True}], ids=["dora"])
def test_cases_it_does_not_cover_go_through_peft(demo_assets, lora) -> None:
    model = lora_model(demo_assets, **lora)
    ids = torch.randint(5, 700, (1, 20))
    fused = copy.deepcopy(model)
    fuse_lora_linears(fused)
    torch.manual_seed(1)
    logits, grads = outputs_and_grads(model, ids)
    torch.manual_seed(1)
    fused_logits, fused_grads = outputs_and_grads(fused, ids)
    assert torch.equal(logits, fused_logits)
    assert all(torch.equal(grads[n], fused_grads[n]) for n in grads)


@pytest.mark.integration
def test_disabled_adapter_gives_the_base(demo_assets) -> None:
    model = lora_model(demo_assets)
    fuse_lora_linears(model)
    ids = torch.randint(5, 700, (1, 12))
    with torch.no_grad():
        tuned = model(input_ids=ids).logits
        with model.disable_adapter():
            base = model(input_ids=ids).logits
        plain = model.get_base_model()
    assert not torch.allclose(tuned, base, atol=1e-3)
    assert plain is not None
