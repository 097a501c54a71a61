"""Replacing a model's float32 torch.nn.Linear layers by layers of another precision or kernel
(tokenwise_int8's int8 layers, bf16_linear's bf16 ones), one by one or, where several take one
same input, as one product over their stacked weights.

A replacement layer is made from a float32 torch.nn.Linear by a `make_layer` callable and has
in_features, out_features and weight() (its weights in its own form, row by row).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

MakeLayer = Callable[[torch.nn.Linear], torch.nn.Module]


class SharedProduct:
    """One layer over the stacked weights of layers that take the same input, and its product
    for the input it was last called with. The pair is read and replaced as one tuple, so a
    caller always gets the product of its own input."""

    def __init__(self, layer: torch.nn.Module):
        self.layer = layer
        self._last: tuple[Optional[torch.Tensor], Optional[torch.Tensor]] = (None, None)

    def of(self, x: torch.Tensor) -> torch.Tensor:
        last_input, product = self._last
        if last_input is not x:
            product = self.layer(x)
            self._last = (x, product)
        return product

    def release(self, *_) -> None:
        self._last = (None, None)


class SharedInputSlice(torch.nn.Module):
    """One of several layers fused by fuse_shared_input_layers: its rows of their shared product."""

    def __init__(self, product: SharedProduct, start: int, stop: int):
        super().__init__()
        self._product = product  # not a submodule: the layers of one group share it
        self.start, self.stop = start, stop
        self.in_features, self.out_features = product.layer.in_features, stop - start

    @property
    def shared_layer(self) -> torch.nn.Module:
        """The layer over the stacked weights whose outputs start:stop this slice is."""
        return self._product.layer

    def weight(self) -> torch.Tensor:
        """This layer's weights, in the shared layer's form."""
        return self._product.layer.weight()[self.start:self.stop]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._product.of(x)[..., self.start:self.stop]

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"rows {self.start}:{self.stop} of a shared product")


def fuse_shared_input_layers(module: torch.nn.Module, names: tuple[str, ...], make_layer: MakeLayer) -> None:
    """Replace, in place, the float32 linear layers `names` of `module`, which `module`'s forward
    applies to one same input (an attention's query, key and value projections; a gated MLP's
    gate and up projections), by SharedInputSlices of one layer over their stacked weights
    (make_layer's): one call per input instead of one per layer. The product is computed by the
    first slice called with an input (again for another input) and dropped when `module`'s
    forward ends."""
    linears = [getattr(module, name) for name in names]
    for name, layer in zip(names, linears):
        if type(layer) is not torch.nn.Linear or layer.weight.dtype != torch.float32:
            raise ValueError(f"fused layers are made from float32 torch.nn.Linear ones; {name} is {layer}")
    if len({layer.in_features for layer in linears}) != 1 or len({layer.bias is None for layer in linears}) != 1:
        raise ValueError(f"{', '.join(names)} cannot share an input: their input sizes or biases differ")
    stacked = torch.nn.Linear(linears[0].in_features, sum(layer.out_features for layer in linears),
                              bias=linears[0].bias is not None)
    with torch.no_grad():
        stacked.weight.copy_(torch.cat([layer.weight for layer in linears]))
        if stacked.bias is not None:
            stacked.bias.copy_(torch.cat([layer.bias for layer in linears]))
    product = SharedProduct(make_layer(stacked))
    start = 0
    for name, layer in zip(names, linears):
        setattr(module, name, SharedInputSlice(product, start, start + layer.out_features))
        start += layer.out_features
    module.register_forward_hook(product.release, always_call=True)


def replace_linear_layers(module: torch.nn.Module, chosen: Callable[[str], bool], make_layer: MakeLayer) -> int:
    """Replace, in place, each float32 torch.nn.Linear of `module` whose name `chosen` accepts
    by make_layer's layer. Returns how many were replaced."""
    replaced = 0
    for name, layer in list(module.named_modules()):
        if type(layer) is not torch.nn.Linear or not chosen(name):
            continue
        if layer.weight.dtype != torch.float32:
            raise ValueError(f"replacement layers are made from float32 ones; {name} is {layer.weight.dtype}")
        parent, _, attribute = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, attribute, make_layer(layer))
        replaced += 1
    return replaced


__all__ = ["MakeLayer", "SharedInputSlice", "SharedProduct", "fuse_shared_input_layers", "replace_linear_layers"]
