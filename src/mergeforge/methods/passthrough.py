"""Passthrough: copy one input tensor, optionally scaled (mergekit's ``passthrough``).

Used to stack layers from different models (frankenmerges) through ``slices``; the result has
the shape of the one input and may be that input tensor itself.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergeforge.methods.base import Method, NoParams, register
from mergeforge.methods.checks import check_real


@dataclass(frozen=True)
class PassthroughModelParams:
    scale: float | None = None
    """Multiply the tensor by this factor (e.g. 0 to silence a layer); none copies it."""

    def __post_init__(self) -> None:
        if self.scale is not None:
            check_real("scale", self.scale)


def passthrough(base, tensors, params, model_params, ctx):
    scale = model_params[0].scale
    return tensors[0] if scale is None else tensors[0] * scale


register(
    Method(
        name="passthrough",
        elementwise=True,
        fn=passthrough,
        summary="Copy the one input tensor, optionally multiplied by 'scale'.",
        reference="https://github.com/arcee-ai/mergekit",
        params=NoParams,
        model_params=PassthroughModelParams,
        base="none",
        max_models=1,
    )
)
