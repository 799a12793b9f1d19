"""quant/methods: one Method protocol; the workers quantize through the registry row of --scale-method."""
from __future__ import annotations

import dataclasses

import torch
from safetensors.torch import load_file

from v4convert.formats.nvfp4 import NVFP4Convention, ScaleMethod, nvfp4_quantize
from v4convert.quant import methods

from .test_quantize import run_quantize


def test_registry_covers_every_scale_method_and_cli_choice() -> None:
    from v4convert.cli import main
    choices = {p.name: p for p in main.commands["quantize"].params}["scale_method"].type.choices
    assert set(methods.METHODS) == set(ScaleMethod)
    assert sorted(m.name for m in methods.METHODS.values()) == sorted(choices)
    assert [m for m, impl in methods.METHODS.items() if impl.fp8_hot_path] == [ScaleMethod.RTN]


def test_methods_are_the_codec_rules_odd_shape() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(7, 48, generator=g) * torch.logspace(-3, 2, 48)
    for m, impl in methods.METHODS.items():
        q = impl.nvfp4(x, convention=NVFP4Convention.MODELOPT, global_amax=None, name="x")
        ref = nvfp4_quantize(x, convention=NVFP4Convention.MODELOPT, method=m, name="x")
        assert torch.equal(q.packed, ref.packed) and torch.equal(q.block_scale.view(torch.uint8),
                                                                ref.block_scale.view(torch.uint8))


class _Zero:
    """A method that writes all-zero codes: the engine must use what the registry says."""
    method = ScaleMethod.MSE
    name = "mse"
    fp8_hot_path = False
    whole_tensor = True
    calls: list = []

    def nvfp4(self, x, *, convention, global_amax, name, side=None):
        self.calls.append((name, tuple(x.shape)))
        q = nvfp4_quantize(x, convention=convention, method=ScaleMethod.RTN, global_amax=global_amax, name=name)
        return dataclasses.replace(q, packed=torch.zeros_like(q.packed))


def test_workers_use_the_registry_row(tiny_ckpts, tmp_path, monkeypatch) -> None:
    fake = _Zero()
    fake.calls = []
    monkeypatch.setitem(methods.METHODS, ScaleMethod.MSE, fake)
    run_quantize(tiny_ckpts["v3-tiny"], tmp_path / "o", scale_method=ScaleMethod.MSE)
    assert fake.calls, "the registry's method was not called"
    name, shape = fake.calls[0]
    assert len(shape) == 2 and shape[0] > 0              # whole_tensor: one call with every row
    tensors = {}
    for f in sorted((tmp_path / "o").glob("*.safetensors")):
        tensors.update(load_file(f))
    packed = [v for k, v in tensors.items() if k.endswith(".weight_packed") or
              (k.endswith(".weight") and v.dtype == torch.uint8)]
    assert packed and any(int(v.count_nonzero()) == 0 for v in packed)
