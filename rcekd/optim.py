"""Adam with L2 weight decay that updates only the rows a batch touched, for row-sparse gradients.

``torch.optim.Adam`` rejects sparse gradients and ``SparseAdam`` has no weight decay. A 70k × 300
embedding table updated densely costs more than the rest of an MF step, so sparse rows matter.
Dense parameters get the textbook Adam update with the same coupled L2 term as ``torch.optim.Adam``.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class RowSparseAdam(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.nn.Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        if lr <= 0 or weight_decay < 0:
            raise ValueError(f"invalid lr={lr} or weight_decay={weight_decay}")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def]
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(param)
                    state["exp_avg_sq"] = torch.zeros_like(param)
                state["step"] += 1
                bias1 = 1 - beta1 ** state["step"]
                bias2 = 1 - beta2 ** state["step"]
                step_size = group["lr"] / bias1
                if param.grad.is_sparse:
                    self._sparse_update(param, state, group, step_size, bias2)
                else:
                    grad = param.grad
                    if group["weight_decay"]:
                        grad = grad.add(param, alpha=group["weight_decay"])
                    state["exp_avg"].lerp_(grad, 1 - beta1)
                    state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                    denom = (state["exp_avg_sq"] / bias2).sqrt_().add_(group["eps"])
                    param.addcdiv_(state["exp_avg"], denom, value=-step_size)
        return loss

    @staticmethod
    def _sparse_update(param, state, group, step_size: float, bias2: float) -> None:  # type: ignore[no-untyped-def]
        beta1, beta2 = group["betas"]
        grad = param.grad.coalesce()  # sums the rows a batch touched several times
        rows = grad.indices()[0]
        values = grad.values()
        if group["weight_decay"]:
            values = values.add(param.index_select(0, rows), alpha=group["weight_decay"])
        exp_avg = state["exp_avg"].index_select(0, rows).lerp_(values, 1 - beta1)
        exp_avg_sq = state["exp_avg_sq"].index_select(0, rows).mul_(beta2).addcmul_(values, values, value=1 - beta2)
        state["exp_avg"].index_copy_(0, rows, exp_avg)
        state["exp_avg_sq"].index_copy_(0, rows, exp_avg_sq)
        update = exp_avg.div_(exp_avg_sq.div_(bias2).sqrt_().add_(group["eps"]))
        param.index_add_(0, rows, update, alpha=-step_size)
