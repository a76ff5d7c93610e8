"""A LoRA linear layer as one matrix product: the base's and the adapter's up-projection share it.

peft computes `base(x) + lora_B(lora_A(x)) * scaling`: besides the base product, an up-projection
of inner size r (8) whose [tokens, out] result is then scaled and added, each a pass over memory,
and as many again in backward. On CPU that made the policy pass of the 25M bench model (32 x 276
tokens, r=8 on every linear layer) 39% slower than the adapter-free forward: a product of inner
size 8 runs far below the matmul throughput (18 ms against the base product's 80 ms for
[8832, 8] x [8, 1280]), and its result goes through memory three times.

Here the adapter's down-projection xa = x A^T is appended to the input, and s B to the weight:

    y = [x, xa] [W, s B]^T + b = x W^T + s xa B^T + b

one product of inner size in + r. Backward, with G = dL/dy:

    [dL/dx_base, dL/dxa] = G [W, s B]      (one product: the base's input gradient and the adapter's)
    dL/dx = dL/dx_base + dL/dxa A
    dL/dA = dL/dxa^T x
    dL/dB = s G^T xa

The base weight and bias are frozen: no gradient is formed for them. `lora_linear` is that
function (tests/test_lora_linear.py checks it with torch.autograd.gradcheck);
`fuse_lora_layers` routes a peft model's LoRA linear layers through it whenever a call is the
plain case (one active adapter, no dropout, no variant such as DoRA, not merged or disabled, one
dtype throughout: the float32 CPU learner) and leaves every other call to peft.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from peft.tuners.lora.layer import Linear as PeftLoraLinear
from torch import Tensor


class _LoraLinear(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, x_M_I: Tensor, weight_O_I: Tensor, bias_O: Tensor | None, a_R_I: Tensor, b_O_R: Tensor, scaling: float
    ):
        xa_M_R = x_M_I @ a_R_I.t()
        weight_O_IR = torch.cat([weight_O_I, b_O_R * scaling], dim=1)
        x_M_IR = torch.cat([x_M_I, xa_M_R], dim=1)
        y_M_O = x_M_IR @ weight_O_IR.t() if bias_O is None else torch.addmm(bias_O, x_M_IR, weight_O_IR.t())
        ctx.save_for_backward(x_M_I, xa_M_R, weight_O_I, a_R_I, b_O_R)
        ctx.scaling = scaling
        return y_M_O

    @staticmethod
    def backward(ctx, grad_M_O: Tensor):
        x_M_I, xa_M_R, weight_O_I, a_R_I, b_O_R = ctx.saved_tensors
        scaling, in_features = ctx.scaling, x_M_I.shape[1]
        need_x, _, _, need_a, need_b, _ = ctx.needs_input_grad
        grad_x = grad_a = grad_b = None
        if need_x or need_a:
            # Concatenated again rather than kept from forward: a copy of every base weight alive
            # until backward would cost the memory of the model once more.
            grad_M_IR = grad_M_O @ torch.cat([weight_O_I, b_O_R * scaling], dim=1)
            grad_xa_M_R = grad_M_IR[:, in_features:]
            if need_x:
                grad_x = torch.addmm(grad_M_IR[:, :in_features], grad_xa_M_R, a_R_I)
            if need_a:
                grad_a = grad_xa_M_R.t() @ x_M_I
        if need_b:
            grad_b = (grad_M_O.t() @ xa_M_R) * scaling
        return grad_x, None, None, grad_a, grad_b, None


def lora_linear(
    x: Tensor, weight_O_I: Tensor, bias_O: Tensor | None, a_R_I: Tensor, b_O_R: Tensor, scaling: float
) -> Tensor:
    """x W^T + b + scaling * (x A^T) B^T over x's last dimension, as one product (module
    docstring); differentiable in x, A and B (the base weight and bias get no gradient)."""
    y_M_O = _LoraLinear.apply(x.reshape(-1, x.shape[-1]), weight_O_I, bias_O, a_R_I, b_O_R, scaling)
    return y_M_O.view(*x.shape[:-1], weight_O_I.shape[0])


def fuse_lora_layers(model: torch.nn.Module) -> int:
    """Route every peft LoRA `Linear` of `model` (peft's own class, not a subclass such as the
    4-bit one) through `lora_linear` for the calls it computes alike (`_plain_call`); returns how
    many layers it routes. The layers keep their parameters, adapters and peft's forward for every
    other call."""
    fused = 0
    for module in model.modules():
        if type(module) is PeftLoraLinear and type(module.base_layer) is torch.nn.Linear:
            module.forward = types.MethodType(_forward, module)
            fused += 1
    return fused


def _forward(layer: PeftLoraLinear, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
    adapter = _plain_call(layer, x, args, kwargs)
    if adapter is None:
        return PeftLoraLinear.forward(layer, x, *args, **kwargs)
    base = layer.base_layer
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    return lora_linear(x, base.weight, base.bias, a, b, layer.scaling[adapter])


def _plain_call(layer: PeftLoraLinear, x: Tensor, args: tuple, kwargs: dict) -> str | None:
    """The one active adapter when this call is y = base(x) + scaling * B(A(x)) with nothing else
    in it (what lora_linear computes); None for peft to take it."""
    if args or kwargs or layer.disable_adapters or layer.merged or len(layer.active_adapters) != 1:
        return None
    adapter = layer.active_adapters[0]
    if adapter not in layer.lora_A or adapter in getattr(layer, "lora_variant", {}) or layer.use_dora.get(adapter):
        return None
    if not isinstance(layer.lora_dropout[adapter], torch.nn.Identity) or layer.lora_B[adapter].bias is not None:
        return None
    base = layer.base_layer
    frozen = not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
    weights = [base.weight, base.bias, layer.lora_A[adapter].weight, layer.lora_B[adapter].weight]
    dtypes = {x.dtype} | {w.dtype for w in weights if w is not None}
    return adapter if frozen and len(dtypes) == 1 else None
