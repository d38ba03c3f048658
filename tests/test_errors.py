"""Bad input raises errors that name the value and the valid choice, before any state changes."""

from __future__ import annotations

import pytest
import torch

import macfn


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("damping", 0.0, r"Invalid damping=0.0: the damping rho must be > 0"),
        ("damping", -1.0, r"Invalid damping=-1.0"),
        ("damping", float("nan"), r"Invalid damping=nan: expected a finite number > 0"),
        ("stat_decay", 1.0, r"Invalid stat_decay=1.0: it must lie in \[0, 1\)"),
        ("stat_decay", -0.1, r"Invalid stat_decay=-0.1"),
        ("lr", -0.1, r"Invalid lr=-0.1: the learning rate must be >= 0"),
        ("momentum", 1.0, r"Invalid momentum=1.0: it must lie in \[0, 1\)"),
        ("weight_decay", -1e-4, r"Invalid weight_decay=-0.0001"),
        ("damping_form", "inverse", r"Invalid damping_form='inverse': expected one of 'decoupled', 'exact'"),
        ("nesterov", "yes", r"Invalid nesterov='yes': expected True or False"),
    ],
)
def test_config_rejects_invalid_value(field, value, message):
    with pytest.raises(ValueError, match=message):
        macfn.MACConfig(**{field: value})


def test_config_is_immutable():
    config = macfn.MACConfig()
    with pytest.raises(AttributeError):
        config.lr = 1.0  # type: ignore[misc]
    assert config.replace(lr=0.5).lr == 0.5
    with pytest.raises(ValueError, match="Invalid damping"):
        config.replace(damping=0.0)


def test_config_defaults_are_authors_cifar_settings():
    config = macfn.MACConfig()
    assert (config.lr, config.momentum, config.weight_decay, config.damping, config.stat_decay) == (
        0.1, 0.9, 5e-4, 1.0, 0.95)
    assert config.damping_form == "decoupled"
    assert not config.nesterov
    assert not config.decoupled_weight_decay


def test_nesterov_needs_momentum():
    with pytest.raises(ValueError, match="Nesterov momentum needs momentum > 0"):
        macfn.MACConfig(momentum=0.0, nesterov=True)


PARAMS = {"fc.weight": torch.zeros(3, 4), "fc.bias": torch.zeros(3)}
GRADS = {"fc.weight": torch.ones(3, 4), "fc.bias": torch.ones(3)}


def test_unknown_grad_name():
    with pytest.raises(ValueError, match=r"Invalid grads: no parameter named 'fc2.weight'"):
        macfn.step(PARAMS, {**GRADS, "fc2.weight": torch.ones(1)})


def test_missing_grad_name():
    with pytest.raises(ValueError, match=r"Missing grads for 'fc.bias': pass a gradient for every parameter, or None"):
        macfn.step(PARAMS, {"fc.weight": GRADS["fc.weight"]})


def test_grad_shape_mismatch():
    with pytest.raises(ValueError, match=r"Invalid grads\['fc.weight'\] of shape \(4, 3\): the parameter has shape \(3, 4\)"):
        macfn.step(PARAMS, {**GRADS, "fc.weight": torch.ones(4, 3)})


def test_stats_for_unknown_parameter():
    with pytest.raises(ValueError, match=r"Invalid stats: no parameter named 'conv.weight'"):
        macfn.step(PARAMS, GRADS, {"conv.weight": torch.ones(1, 5)})


def test_stats_shape_mismatch():
    with pytest.raises(ValueError, match=r"needs 4 columns \(5 with a bias\)"):
        macfn.step(PARAMS, GRADS, {"fc.weight": torch.ones(1, 7)})
    with pytest.raises(ValueError, match=r"output rows must split into that many equal blocks"):
        macfn.step(PARAMS, GRADS, {"fc.weight": torch.ones(2, 5)})


def test_stats_bias_column_without_bias():
    with pytest.raises(ValueError, match=r"params has no bias 'fc.bias'"):
        macfn.step({"fc.weight": PARAMS["fc.weight"]}, {"fc.weight": GRADS["fc.weight"]},
                   {"fc.weight": torch.ones(1, 5)})


def test_negative_lr_override():
    with pytest.raises(ValueError, match=r"Invalid lr=-1.0"):
        macfn.step(PARAMS, GRADS, lr=-1.0)


def test_state_from_other_params_rejected():
    state = macfn.init({"other": torch.zeros(2)}, macfn.MACConfig())
    with pytest.raises(ValueError, match=r"momentum buffers are missing for \['fc.bias', 'fc.weight'\]"):
        macfn.step(PARAMS, GRADS, None, state)


def test_errors_leave_state_unchanged():
    config = macfn.MACConfig()
    state = macfn.init(PARAMS, config, {"fc.weight": torch.ones(1, 5)})
    snapshot = {key: (dict(value) if isinstance(value, dict) else value) for key, value in state.items()}
    with pytest.raises(ValueError):
        macfn.step(PARAMS, GRADS, {"fc.weight": torch.ones(1, 9)}, state, config)
    assert state["step"].item() == 0
    for key in ("momentum", "mean_activation", "stat_count"):
        assert state[key].keys() == snapshot[key].keys()
        for name in state[key]:
            assert state[key][name] is snapshot[key][name]


def test_config_of_wrong_type():
    with pytest.raises(TypeError, match=r"expected macfn.MACConfig"):
        macfn.step(PARAMS, GRADS, None, None, {"lr": 0.1})  # type: ignore[arg-type]
