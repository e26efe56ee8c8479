"""Invalid options raise a ValueError naming the option and the allowed values."""
import pytest
import torch

import gradproj as gp


def param():
    return torch.nn.Parameter(torch.randn(8, 8))


@pytest.mark.parametrize("options, match", [
    ({"rank": -1}, "'rank' must be an integer >= 1"),
    ({"rank": 2.5}, "'rank' must be an integer >= 1"),
    ({"update_gap": 0}, "'update_gap'"),
    ({"lr": -1.0}, "'lr'"),
    ({"proj_type": "diagonal"}, "'proj_type' must be one of std, reverse_std"),
    ({"betas": (0.9, 1.0)}, r"'betas' must be 2 numbers in \[0, 1\)"),
    ({"betas": (-0.1, 0.9)}, "'betas'"),
    ({"rule": "adamm"}, "option 'rule': unknown rule 'adamm'; did you mean 'adam"),
    ({"projector": "svdd"}, "option 'projector': unknown projector 'svdd'; did you mean 'svd'"),
    ({"state_format": "fp64"}, "option 'state_format': unknown state format"),
    ({"residual": "fira2"}, "option 'residual': unknown residual"),
    ({"projector": "randomized", "projector_options": {"oversample": -2}}, "'oversample'"),
    ({"projector": "randomized", "projector_options": {"power": 2}}, "unknown options: power"),
])
def test_invalid_option_names_itself(options, match):
    with pytest.raises(ValueError, match=match):
        gp.LowRankOptimizer([{"params": [param()], "lowrank": True}], **options)


def test_invalid_option_in_added_group():
    opt = gp.LowRankOptimizer([param()], lr=1e-3)
    with pytest.raises(ValueError, match="'rank'"):
        opt.add_param_group({"params": [param()], "rank": 0})


def test_per_group_overrides_and_scheduler_and_closure():
    a, b = param(), torch.nn.Parameter(torch.randn(5))
    opt = gp.LowRankOptimizer([{"params": [a], "rank": 2, "lr": 0.1, "projector": "randomized"},
                               {"params": [b]}], lr=0.01)
    assert opt.param_groups[0]["lowrank"] and not opt.param_groups[1]["lowrank"]
    assert opt.param_groups[0]["lr"] == 0.1 and opt.param_groups[1]["lr"] == 0.01
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)

    def closure():
        opt.zero_grad()
        loss = (a.sum() + b.sum()) ** 2
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert loss is not None and a.grad is not None
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert opt.state[a]["proj_right"].shape == (8, 2)
    assert "proj_right" not in opt.state[b]
    opt.zero_grad()
    assert a.grad is None


def test_add_param_group_inherits_defaults():
    opt = gp.LowRankOptimizer([param()], lr=1e-3, betas=(0.8, 0.9))
    opt.add_param_group({"params": [param()], "rank": 3})
    group = opt.param_groups[-1]
    assert group["lowrank"] and group["rank"] == 3 and group["betas"] == (0.8, 0.9)
