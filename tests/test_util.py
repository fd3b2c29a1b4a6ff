from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from ldm.util import ConfigError, instantiate_from_config


class Outer(torch.nn.Module):
    def __init__(self, width: int, inner_config: dict | None = None, scale: float = 1.0):
        super().__init__()
        self.lin = torch.nn.Linear(width, width)
        self.inner = instantiate_from_config(inner_config, key="inner_config") if inner_config else None
        self.scale = scale


def test_builds_nested_objects_from_omegaconf():
    cfg = OmegaConf.create({"target": "tests.test_util.Outer",
                            "params": {"width": 3, "inner_config": {"target": "torch.nn.Linear",
                                                                    "params": {"in_features": 2, "out_features": 5}}}})
    obj = instantiate_from_config(cfg, key="model")
    assert isinstance(obj.inner, torch.nn.Linear) and obj.inner.out_features == 5


def test_misspelt_parameter_names_key_class_and_accepted():
    with pytest.raises(ConfigError) as e:
        instantiate_from_config({"target": "tests.test_util.Outer", "params": {"widht": 3}}, key="model")
    msg = str(e.value)
    assert msg.startswith("model.params:")
    assert "tests.test_util.Outer does not accept 'widht' (did you mean 'width'?)" in msg
    assert "accepted parameters: width, inner_config, scale" in msg


def test_nested_error_carries_full_path():
    cfg = {"target": "tests.test_util.Outer",
           "params": {"width": 3, "inner_config": {"target": "torch.nn.Linear",
                                                   "params": {"in_features": 2, "out_feature": 5}}}}
    with pytest.raises(ConfigError) as e:
        instantiate_from_config(cfg, key="model")
    assert e.value.key == "model.params.inner_config.params"
    assert "did you mean 'out_features'" in str(e.value)


def test_unknown_target_and_missing_required():
    with pytest.raises(ConfigError, match=r"model.target: module 'torch.nn' has no attribute 'Linaer'; did you mean Linear"):
        instantiate_from_config({"target": "torch.nn.Linaer"}, key="model")
    with pytest.raises(ConfigError, match=r"model.target: cannot import module 'ldm.no_such_module'"):
        instantiate_from_config({"target": "ldm.no_such_module.Thing"}, key="model")
    with pytest.raises(ConfigError, match=r"needs 'width'"):
        instantiate_from_config({"target": "tests.test_util.Outer", "params": {}}, key="model")


def test_misspelt_node_keys():
    with pytest.raises(ConfigError, match=r"model: has no 'target' \(found 'targt': misspelt\?\)"):
        instantiate_from_config({"targt": "torch.nn.Identity"}, key="model")
    with pytest.raises(ConfigError, match=r"model: unexpected key\(s\) 'parms'"):
        instantiate_from_config({"target": "torch.nn.Identity", "parms": {}}, key="model")
