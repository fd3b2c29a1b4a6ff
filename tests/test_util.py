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


def test_a_value_of_the_wrong_type_names_its_key_and_the_type():
    with pytest.raises(ConfigError) as e:
        instantiate_from_config({"target": "tests.test_util.Outer", "params": {"width": "abc"}}, key="model")
    assert str(e.value) == "model.params.width: expected an integer, got 'abc' (str)"
    with pytest.raises(ConfigError) as e:
        instantiate_from_config({"target": "tests.test_util.Outer", "params": {"width": 3, "scale": [1]}}, key="model")
    assert str(e.value) == "model.params.scale: expected a number, got [1] (list)"
    # ints are numbers, None is allowed where the annotation says so
    assert instantiate_from_config({"target": "tests.test_util.Outer",
                                    "params": {"width": 3, "scale": 2, "inner_config": None}}).scale == 2


def test_first_stage_ddconfig_keys_and_types_are_checked():
    vq = OmegaConf.to_container(OmegaConf.load("configs/test/first_stage_vq.yaml").model)
    vq["params"]["ddconfig"]["ch_mul"] = vq["params"]["ddconfig"].pop("ch_mult")
    with pytest.raises(ConfigError) as e:
        instantiate_from_config(vq, key="model")
    assert str(e.value).startswith("model.params.ddconfig: Encoder and Decoder do not read 'ch_mul' (did you mean "
                                   "'ch_mult'?); keys they read: ")
    vq["params"]["ddconfig"]["ch_mult"] = vq["params"]["ddconfig"].pop("ch_mul")
    vq["params"]["ddconfig"]["z_channels"] = "sixteen"
    with pytest.raises(ConfigError) as e:
        instantiate_from_config(vq, key="model")
    assert str(e.value) == "model.params.ddconfig.z_channels: expected an integer >= 1, got 'sixteen' (str)"
    vq["params"]["ddconfig"]["z_channels"] = 16
    vq["params"]["n_embed"] = "abc"
    with pytest.raises(ConfigError) as e:
        instantiate_from_config(vq, key="model")
    assert str(e.value) == "model.params.n_embed: expected an integer >= 1, got 'abc' (str)"
