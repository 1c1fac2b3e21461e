"""Every fused op is differentiable once, and says so when asked for more: a backward
with create_graph=True (Hessian-vector products) raises instead of silently dropping the
second-order terms."""

import pytest
import torch

import rlhf_fast

F64 = torch.float64


def _logprobs(x):
    return rlhf_fast.logprobs(x.view(2, 5), torch.tensor([1, 3])).sum()


def _linear_logprobs(x):
    weight = torch.linspace(-1, 1, 35, dtype=F64).view(7, 5)
    return rlhf_fast.linear_logprobs(x.view(2, 5), weight, torch.tensor([1, 3])).sum()


def _ppo_loss(x):
    x = x.view(2, 5)
    return rlhf_fast.ppo_loss(x, x.detach() * 0.9, torch.ones(2, 5, dtype=F64),
                              torch.ones(2, 5, dtype=torch.bool)).loss


def _dpo_loss(x):
    return rlhf_fast.dpo_loss(x[:5], x[5:], torch.zeros(5, dtype=F64),
                              torch.zeros(5, dtype=F64)).loss


def _sequence_logps(x):
    return rlhf_fast.sequence_logps(x.view(2, 5), torch.ones(2, 5)).pow(2).sum()


def _masked_whiten(x):
    return rlhf_fast.masked_whiten(x.view(2, 5), torch.ones(2, 5)).pow(3).sum()


def _masked_mean(x):
    return rlhf_fast.masked_mean(x.view(2, 5), torch.ones(2, 5)).pow(2)


@pytest.mark.parametrize("loss", [_logprobs, _linear_logprobs, _ppo_loss, _dpo_loss,
                                  _sequence_logps, _masked_whiten, _masked_mean])
def test_hessian_refused_first_derivative_kept(loss):
    x = torch.randn(10, dtype=F64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss(x), x)
    assert grad.abs().sum() > 0
    with pytest.raises(RuntimeError, match="differentiable once"):
        torch.autograd.functional.hessian(loss, x.detach())
