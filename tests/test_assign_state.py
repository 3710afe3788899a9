"""runtime.loader.assign_state (issue 12): runtime.load sets the decoded tensors straight into
the modules where load_state_dict(strict=True, assign=True) would do nothing more."""

from __future__ import annotations

import torch

from runtime.loader import assign_state
from runtime.zoo import build


def test_assign_state_leaves_what_load_state_dict_would() -> None:
    """assign_state's direct path and load_state_dict(assign=True) leave the same module:
    the same tensors (shared, not copied), Parameters with their requires_grad, buffers;
    a module with a load hook goes through load_state_dict."""
    def fresh() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        module = build("cifar_resnet20")
        torch.manual_seed(1)
        donor = build("cifar_resnet20").state_dict()
        return module, {k: v.clone() for k, v in donor.items()}

    direct, state = fresh()
    assign_state(direct, state)
    reference, state_ref = fresh()
    reference.load_state_dict(state_ref, strict=True, assign=True)
    for (name, got), (_, want) in zip(direct.state_dict(keep_vars=True).items(),
                                      reference.state_dict(keep_vars=True).items(), strict=True):
        assert type(got) is type(want) and torch.equal(got, want), name
        assert got.requires_grad == want.requires_grad and got is not want
        assert got.data_ptr() == state[name].data_ptr()  # assigned, not copied
    hooked, state = fresh()
    calls = []
    hooked.linear.register_load_state_dict_pre_hook(lambda *args, **kwargs: calls.append(1))
    assign_state(hooked, state)
    assert calls == [1] and torch.equal(hooked.linear.weight, state["linear.weight"])
