"""One SGD step of a plain MLP with its backward pass written out, bit for bit autograd's.

An MLP step on a 64-row batch is a few small matrix products; on a CPU, autograd's graph, the
module calls and the optimizer's Python bookkeeping around them cost about a tenth of the
epoch (docs/benchmarks.md, "Training loop"). This step calls the same ATen kernels that
autograd and `torch.optim.SGD(fused=True)` call, with the same arguments and in the same
order, so weights, BatchNorm statistics and momentum come out equal bit for bit (pinned by
tests/test_training.py::test_the_loop_is_bit_for_bit_the_plain_loop); anything else trains
through autograd (`MlpStep.for_model` returns None).
"""

from __future__ import annotations

import torch
from torch import nn

from pipeline.core.models import Scale

_aten = torch.ops.aten
_MEAN_REDUCTION = 1  # torch.nn._reduction.get_enum("mean")
_NO_IGNORED_CLASS = -100  # F.cross_entropy's default ignore_index


class MlpStep:
    """`step(xb, yb)`: cross-entropy forward, backward and one fused SGD update of `model`.

    Built by `for_model` for an `nn.Sequential` of an optional `Scale`, then blocks of
    Linear, optional BatchNorm1d and ReLU, then a final Linear (what pipeline.core.models
    builds for `type: mlp`), trained in fp32 on the CPU with plain momentum SGD.
    """

    def __init__(self, optimizer: torch.optim.SGD, scale: float | None,
                 blocks: list[tuple[nn.Linear, nn.BatchNorm1d | None]], output: nn.Linear):
        self.optimizer = optimizer
        self.group = optimizer.param_groups[0]
        self.params = list(self.group["params"])
        self.scale, self.blocks, self.output = scale, blocks, output
        # Weight gradients go into the same buffers every step, as the optimizer only reads them.
        self.weight_grads = {id(lin.weight): torch.empty_like(lin.weight)
                             for lin in [*(lin for lin, _ in blocks), output]}
        self.one = torch.ones((), dtype=torch.float32)

    @classmethod
    def for_model(cls, model: nn.Module, optimizer: torch.optim.Optimizer,
                  device: torch.device, precision: str) -> MlpStep | None:
        """The step for `model`, or None where only autograd is known to be right: another
        architecture, a GPU, bf16 or fp64 weights, or an optimizer other than one group of fused
        momentum SGD over exactly the model's parameters."""
        if (device.type != "cpu" or precision != "fp32" or not isinstance(model, nn.Sequential)
                or not _fused_momentum_sgd(optimizer, model)):
            return None
        layers = list(model)
        scale = None
        if layers and type(layers[0]) is Scale:
            scale, layers = layers[0].factor, layers[1:]
        blocks: list[tuple[nn.Linear, nn.BatchNorm1d | None]] = []
        while len(layers) > 1:
            if type(layers[0]) is not nn.Linear:
                return None
            linear, layers = layers[0], layers[1:]
            norm = None
            if type(layers[0]) is nn.BatchNorm1d:
                norm, layers = layers[0], layers[1:]
                if not (norm.affine and norm.track_running_stats and norm.momentum is not None):
                    return None
            if not layers or type(layers[0]) is not nn.ReLU:
                return None
            blocks.append((linear, norm))
            layers = layers[1:]
        if len(layers) != 1 or type(layers[0]) is not nn.Linear:
            return None
        if not all(linear.bias is not None for linear, _ in [*blocks, (layers[0], None)]):
            return None
        return cls(optimizer, scale, blocks, layers[0])

    def __call__(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        with torch.no_grad():
            self._set_gradients(xb, yb)
            self._fused_sgd()

    def _set_gradients(self, xb: torch.Tensor, yb: torch.Tensor) -> None:
        h = xb * self.scale if self.scale is not None else xb
        saved = []
        for linear, norm in self.blocks:
            # F.linear's kernel; BatchNorm1d.forward's in training mode.
            z = torch.addmm(linear.bias, h, linear.weight.t())
            if norm is not None:
                y, mean, invstd = _aten.native_batch_norm(
                    z, norm.weight, norm.bias, norm.running_mean, norm.running_var, True,
                    norm.momentum, norm.eps)
                norm.num_batches_tracked.add_(1)
            else:
                y = mean = invstd = None
            activation = (y if y is not None else z).relu_()
            saved.append((h, z, mean, invstd, activation))
            h = activation
        logits = torch.addmm(self.output.bias, h, self.output.weight.t())
        # F.cross_entropy: log_softmax, then nll_loss; backward through both in reverse.
        log_probs = torch.log_softmax(logits, 1)
        _, total_weight = _aten.nll_loss_forward(log_probs, yb, None, _MEAN_REDUCTION,
                                                 _NO_IGNORED_CLASS)
        grad = _aten.nll_loss_backward(self.one, log_probs, yb, None, _MEAN_REDUCTION,
                                       _NO_IGNORED_CLASS, total_weight)
        grad = _aten._log_softmax_backward_data(grad, log_probs, 1, torch.float32)
        grad_input = self._linear_backward(self.output, grad, h, need_input_grad=True)
        for index in range(len(self.blocks) - 1, -1, -1):
            linear, norm = self.blocks[index]
            h, z, mean, invstd, activation = saved[index]
            grad = _aten.threshold_backward(grad_input, activation, 0)
            if norm is not None:
                grad, norm.weight.grad, norm.bias.grad = _aten.native_batch_norm_backward(
                    grad, z, norm.weight, norm.running_mean, norm.running_var, mean, invstd,
                    True, norm.eps, [True, True, True])
            grad_input = self._linear_backward(linear, grad, h, need_input_grad=index > 0)

    def _linear_backward(self, linear: nn.Linear, grad: torch.Tensor, h: torch.Tensor,
                         need_input_grad: bool) -> torch.Tensor | None:
        # Autograd's addmm backward for a weight stored (out, in): grad.t() @ input, in the
        # weight's own layout; the bias gradient is grad summed over the batch.
        linear.weight.grad = torch.mm(grad.t(), h, out=self.weight_grads[id(linear.weight)])
        linear.bias.grad = grad.sum(0)
        return grad.mm(linear.weight) if need_input_grad else None

    def _fused_sgd(self) -> None:
        # What SGD(fused=True).step() runs, without its per-step Python (grouping tensors by
        # device, hooks): the momentum buffers live in the optimizer's state, so its
        # state_dict, checkpoints and resume see them as before.
        state = self.optimizer.state
        first_step = any("momentum_buffer" not in state[p] for p in self.params)
        if first_step:
            for p in self.params:
                state[p]["momentum_buffer"] = torch.empty_like(p)
        group = self.group
        torch._fused_sgd_(
            self.params, [p.grad for p in self.params],
            [state[p]["momentum_buffer"] for p in self.params],
            weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
            dampening=group["dampening"], nesterov=group["nesterov"], maximize=group["maximize"],
            is_first_step=first_step, grad_scale=None, found_inf=None)


def _fused_momentum_sgd(optimizer: torch.optim.Optimizer, model: nn.Module) -> bool:
    if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
        return False
    group = optimizer.param_groups[0]
    model_params = list(model.parameters())
    return (group.get("fused") is True and group["momentum"] > 0
            and len(group["params"]) == len(model_params)
            and all(a is b for a, b in zip(group["params"], model_params))
            and all(p.requires_grad and p.dtype == torch.float32 for p in model_params))
