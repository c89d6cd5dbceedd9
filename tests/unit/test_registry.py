"""The one registry of compiled artifacts: kept on the module, one per (module, config, name), gone with the module."""
import copy
import gc
import weakref

import torch

from sd_accel.accel_core import registry
from sd_accel.accel_core.compiling import CompileConfig

CFG = CompileConfig(backend="inductor", torch_backend="eager")


def _module():
    return torch.nn.Sequential(torch.nn.Linear(2, 2))


def test_one_compiled_callable_per_module_config_and_name():
    m = _module()
    whole = registry.compiled_for(m, CFG)
    assert registry.compiled_for(m, CFG) is whole
    path = registry.compiled_for(m, CFG, "deepcache full d0", entry=lambda x: m(x))
    assert path is not whole and registry.compiled_for(m, CFG, "deepcache full d0") is path
    assert {registry.key_config(k) for k in registry.compiled_of(m)} == {CFG}
    assert registry.compiled_of(_module()) == {}  # asking creates nothing
    assert set(m.state_dict()) == {"0.weight", "0.bias"}  # a plain attribute: no state_dict entry, no submodule


def test_a_copy_of_the_module_starts_empty_and_the_module_is_freed_with_its_artifacts():
    m = _module()
    registry.compiled_for(m, CFG)
    assert registry.compiled_of(copy.deepcopy(m)) == {}
    ref = weakref.ref(m)
    assert any(mod is m for mod, _ in registry.modules())
    del m
    gc.collect()
    assert ref() is None  # the compiled callable refers to the module: a cycle, freed together


def test_clear():
    registry.clear()
    a, b = _module(), _module()
    registry.compiled_for(a, CFG)
    registry.artifacts(b).copy = _module()
    assert registry.clear() == 2
    assert registry.compiled_of(a) == {} and registry.modules() == []
