"""C3A: the ``c3a_weight`` op against PEFT's own layers (FFT forward and circulant merge, several
block sizes), ``block_size_pattern`` end to end, the parser's refusals, and a broken formula that
verification must catch."""

from __future__ import annotations

import copy
import warnings

import models
import pytest
import torch
from conftest import adapt, assert_outputs_close, eager, edited_adapter, export
from peft_check import assert_caught, check_against_peft
from torch import nn

from peftc import ir
from peftc.errors import InputError, UnsupportedError
from peftc.loaders.inputs import parse_inputs
from peftc.methods import c3a as c3a_ops
from peftc.methods.c3a import C3A_WEIGHT
from peftc.methods.loading import load_adapter


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(8, 12)
        self.down = nn.Linear(12, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.tanh(self.up(x)))


class Layers(nn.Module):
    """Two blocks, so ``block_size_pattern`` keys match module-name suffixes."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks[1](torch.tanh(self.blocks[0](x)).repeat(1, 2))


INPUTS = ["x:batch,8:float32"]


def layers() -> nn.Module:
    torch.manual_seed(0)
    return Layers().eval().requires_grad_(False)


def _config(**kwargs):
    from peft import C3AConfig

    kwargs.setdefault("block_size", 2)
    return C3AConfig(target_modules=["up", "down"], **kwargs)


def _rel(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("block_size", [1, 2, 4])
def test_op_matches_peft_forward_and_merge(block_size):
    from peft import get_peft_model

    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_model = get_peft_model(layers(), _config(block_size=block_size, init_weights="gaussian"))
    merged = copy.deepcopy(peft_model).merge_and_unload()
    for name in ("blocks.0.up", "blocks.0.down"):
        layer = peft_model.base_model.model.get_submodule(name)
        base = layer.get_base_layer()
        kernel = layer.c3a_kernel["default"]
        with torch.no_grad():
            adapted = C3A_WEIGHT.overload(base.weight, kernel)
            assert _rel(adapted, merged.get_submodule(name).weight) < 1e-6, name
            x = torch.randn(3, base.in_features, generator=torch.Generator().manual_seed(2))
            expected = layer(x)
            assert _rel(torch.func.functional_call(base, {"weight": adapted}, (x,)), expected) < 1e-5, name
            assert _rel(base(x), expected) > 0.02, f"{name}: the adapter barely changes the output"


@pytest.fixture(scope="module")
def program():
    return export(layers(), parse_inputs(INPUTS))


def test_block_size_pattern_matches_peft_end_to_end(tmp_path, program):
    config = _config(block_size_pattern={"0.up": 4, "blocks.1.down": 1}, bias="c3a_only")
    path = models.make_adapter(layers(), tmp_path / "a", config)
    parsed = load_adapter(path, ir.module_table(program))
    sizes = {s.module: s.info["block_size"] for s in parsed.sites}
    assert sizes == {"blocks.0.up": 4, "blocks.0.down": 2, "blocks.1.up": 2, "blocks.1.down": 1}
    reference = adapt(program, path)
    for batch in (1, 3):
        inputs = parse_inputs(INPUTS).example({"batch": batch}, seed=batch)
        expected = models.peft_outputs(layers(), path, inputs)
        assert_outputs_close(eager(reference, inputs), expected)
        assert _rel(eager(program, inputs)["output"], torch.as_tensor(expected["output"])) > 0.02


# --------------------------------------------------------------------------------------------
# refusals


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    # b=4: with b=2 a circular convolution and a correlation coincide (the mutation below).
    return models.make_adapter(layers(), tmp_path_factory.mktemp("c3a") / "a", _config(block_size=4))


@pytest.mark.parametrize(
    ("config", "tensors", "error", "match"),
    [
        (
            None,
            {"base_model.model.blocks.0.down.c3a_kernel": torch.ones(3, 1, 4)},
            InputError,
            r"down\.c3a_kernel: shape \[3, 1, 4\] .* expected \[1, 3, 4\] for 'blocks\.0\.down' .*block_size=4",
        ),
        ({"block_size": 3}, None, InputError, r"block_size=3 does not divide both dimensions of 'blocks\.0\.down'"),
        ({"block_size": 0}, None, InputError, r"block_size for 'blocks\.0\.down'=0; expected an integer >= 1"),
        ({"exclude_modules": ["up"]}, None, UnsupportedError, r"fields peftc does not know .*exclude_modules"),
    ],
    ids=["shape", "divides", "zero", "unknown-field"],
)
def test_refusals_name_the_cause(tmp_path, adapter, program, config, tensors, error, match):
    with pytest.raises(error, match=match):
        load_adapter(
            edited_adapter(adapter, tmp_path / "bad", config=config, tensors=tensors), ir.module_table(program)
        )


def test_convolution_is_refused(tmp_path):
    from safetensors.torch import save_file

    table = ir.module_table(export(models.Single(nn.Conv2d(2, 4, 1)).eval(), parse_inputs(["x:batch,2,3,3:float32"])))
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "C3A", "target_modules": ["layer"], "block_size": 2}')
    save_file({"base_model.model.layer.c3a_kernel": torch.ones(2, 1, 2)}, tmp_path / "adapter_model.safetensors")
    with pytest.raises(UnsupportedError, match=r"C3A on Conv2d \(module 'layer'\) is not supported"):
        load_adapter(tmp_path, table)


# --------------------------------------------------------------------------------------------
# verification catches a broken formula


def test_mutation_convolution_instead_of_correlation_fails_verification(adapter, monkeypatch):
    """Reading kernel element ``(t − j) mod b`` (a circular convolution) instead of ``(j − t)`` must not pass."""
    assert check_against_peft(layers(), adapter, INPUTS).passed
    real = c3a_ops.delta_weight

    def convolved(kernel, d_in):
        return real(kernel.flip(-1).roll(1, -1), d_in)

    monkeypatch.setattr(c3a_ops, "delta_weight", convolved)
    assert_caught(check_against_peft(layers(), adapter, INPUTS))
