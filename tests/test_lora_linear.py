"""learner.lora_linear: the hand-derived gradient against autograd's numerical one, and a peft
model routed through it computing what peft computes (outputs and LoRA gradients), with every call
it does not handle left to peft."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from learner.logprobs import Sequence, scored_logprobs
from learner.lora_linear import fuse_lora_layers, lora_linear
from learner.model import load_policy
from learner.reference import reference_weights
from shared.config import LearnerConfig


@pytest.mark.parametrize("bias", [True, False])
def test_gradient_is_autograds(bias: bool) -> None:
    g = torch.Generator().manual_seed(0)

    def rand(*shape, grad=False):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    x = rand(2, 5, 6, grad=True)  # [batch, length, in]: the layer sees any leading shape
    weight, a, b = rand(4, 6), rand(3, 6, grad=True), rand(4, 3, grad=True)
    b_O = rand(4) if bias else None
    assert torch.autograd.gradcheck(lambda x, a, b: lora_linear(x, weight, b_O, a, b, 0.7), (x, a, b))


def test_value_is_the_sum_of_base_and_scaled_adapter() -> None:
    g = torch.Generator().manual_seed(1)
    x, weight, bias = torch.randn(3, 6, generator=g), torch.randn(4, 6, generator=g), torch.randn(4, generator=g)
    a, b = torch.randn(2, 6, generator=g), torch.randn(4, 2, generator=g)
    expected = x @ weight.T + bias + 0.5 * (x @ a.T) @ b.T
    torch.testing.assert_close(lora_linear(x, weight, bias, a, b, 0.5), expected)


def test_frozen_input_gets_no_gradient_and_the_adapter_still_does() -> None:
    """The first layer's input (frozen embeddings) needs no gradient: backward skips it."""
    g = torch.Generator().manual_seed(2)
    x, weight = torch.randn(3, 6, generator=g), torch.randn(4, 6, generator=g)
    a, b = torch.randn(2, 6, generator=g).requires_grad_(), torch.randn(4, 2, generator=g).requires_grad_()
    lora_linear(x, weight, None, a, b, 2.0).square().sum().backward()
    assert x.grad is None and a.grad is not None and b.grad is not None
    a0, b0 = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    (x @ weight.T + 2.0 * (x @ a0.T) @ b0.T).square().sum().backward()
    torch.testing.assert_close((a.grad, b.grad), (a0.grad, b0.grad))


def _mlp(dropout: float = 0.0, use_dora: bool = False):
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.SiLU(), torch.nn.Linear(8, 5, bias=False))
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules=["0", "2"], use_dora=use_dora)
    model = get_peft_model(base, config)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # peft starts B at zero: the adapter would add nothing
            torch.nn.init.normal_(p, std=0.5)
    return model


def _out_and_grads(model, x: torch.Tensor):
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), grads


def test_a_fused_peft_model_computes_what_peft_computes() -> None:
    x = torch.randn(3, 7, 6, generator=torch.Generator().manual_seed(3))
    peft_model, fused_model = _mlp(), _mlp()
    assert fuse_lora_layers(fused_model) == 2
    y, grads = _out_and_grads(peft_model, x)
    y_fused, grads_fused = _out_and_grads(fused_model, x)
    assert sorted(grads) == sorted(grads_fused) and len(grads) == 4  # A and B of both layers, nothing else
    torch.testing.assert_close(y_fused, y)
    torch.testing.assert_close(grads_fused, grads, rtol=1e-5, atol=1e-5)  # summed in another order


def test_calls_it_does_not_compute_are_peft_s() -> None:
    """Adapter disabled, merged, dropout, DoRA: each as peft computes it."""
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(4))
    peft_model, fused_model = _mlp(), _mlp()
    fuse_lora_layers(fused_model)
    with peft_model.disable_adapter(), fused_model.disable_adapter():
        torch.testing.assert_close(fused_model(x), peft_model(x))
        torch.testing.assert_close(fused_model(x), peft_model.get_base_model()(x))
    for model in (peft_model, fused_model):
        model.merge_adapter()
    torch.testing.assert_close(fused_model(x), peft_model(x))
    for dropout, dora in [(0.5, False), (0.0, True)]:
        peft_model, fused_model = _mlp(dropout, dora), _mlp(dropout, dora)
        fuse_lora_layers(fused_model)
        torch.manual_seed(5)
        y, grads = _out_and_grads(peft_model, x)
        torch.manual_seed(5)  # the same dropout masks
        y_fused, grads_fused = _out_and_grads(fused_model, x)
        torch.testing.assert_close((y_fused, grads_fused), (y, grads), rtol=0, atol=0)


def test_the_learner_s_policy_scores_and_learns_as_peft_s(tiny_model_dir: Path) -> None:
    """The learner loads its policy fused (cfg.fused_lora); its log-probabilities and LoRA
    gradients are peft's, and its reference pass (adapter disabled) is the base's."""
    cfg = LearnerConfig(model=str(tiny_model_dir))
    fused, tokenizer = load_policy(str(tiny_model_dir), cfg)
    plain, _ = load_policy(str(tiny_model_dir), cfg.model_copy(update={"fused_lora": False}))
    assert fused.get_base_model().model.layers[0].self_attn.q_proj.forward.__func__.__module__ == "learner.lora_linear"
    assert "forward" not in vars(plain.get_base_model().model.layers[0].self_attn.q_proj)
    with torch.no_grad():
        for model in (fused, plain):
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.1)
    g = torch.Generator().manual_seed(6)
    vocab = len(tokenizer)
    sequences = [
        Sequence.continuation(
            torch.randint(3, vocab, (5,), generator=g).tolist(), torch.randint(3, vocab, (n,), generator=g).tolist()
        )
        for n in (9, 4, 0)
    ]
    kwargs = {"temperature": 1.0, "chunk_size": 1024, "pad_id": tokenizer.pad_token_id}

    def score(model):
        model.zero_grad(set_to_none=True)
        logprobs = scored_logprobs(model, sequences, **kwargs)
        logprobs.sum().backward()
        with torch.no_grad(), reference_weights(model):
            reference = scored_logprobs(model, sequences, **kwargs)
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        return logprobs.detach(), reference, grads

    fused_logprobs, fused_reference, fused_grads = score(fused)
    logprobs, reference, grads = score(plain)
    torch.testing.assert_close(fused_logprobs, logprobs)
    assert not torch.equal(fused_logprobs, fused_reference)  # the adapter changes the scores
    torch.testing.assert_close(fused_reference, reference, rtol=0, atol=0)
    assert len(grads) == 2 * 7 * plain.get_base_model().config.num_hidden_layers
    torch.testing.assert_close(fused_grads, grads)
