"""Device mesh and placement helpers.

Everything parallel in lark-jax runs under ``jax.jit`` on arrays placed with
``NamedSharding`` on one mesh with axes ("data", "model"): batches split over
"data", parameters replicated or split over "model". The same code then runs
on one CPU, eight GPUs or a multi-host TPU slice.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from lark_jax.errors import LarkError


def make_mesh(model: int = 1, data: int | None = None, devices=None) -> jax.sharding.Mesh:
    """A ("data", "model") mesh over all devices; ``data`` defaults to the rest."""
    devices = list(devices) if devices is not None else jax.devices()
    n = len(devices)
    if model < 1 or n % model:
        raise LarkError(f"model-parallel size {model} does not divide {n} devices")
    data = n // model if data is None else data
    if data * model != n:
        raise LarkError(f"mesh {data}x{model} does not match {n} devices")
    # Auto axes: XLA's partitioner propagates shardings (no sharding-in-types).
    return jax.make_mesh((data, model), ("data", "model"), axis_types=(AxisType.Auto,) * 2,
                         devices=devices)


def replicated(mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharding(mesh, ndim: int) -> NamedSharding:
    """Split the leading (batch) axis over "data", replicate the rest."""
    return NamedSharding(mesh, P("data", *([None] * (ndim - 1))))


def param_sharding(mesh, shape: tuple[int, ...], split_axis: int | None) -> NamedSharding:
    """Split ``split_axis`` over "model" when it divides evenly, else replicate."""
    m = mesh.shape.get("model", 1)
    if split_axis is None or m == 1 or shape[split_axis] % m:
        return replicated(mesh)
    spec = [None] * len(shape)
    spec[split_axis] = "model"
    return NamedSharding(mesh, P(*spec))


def mesh_summary(mesh) -> str:
    kinds = sorted({d.platform for d in np.asarray(mesh.devices).flat})
    dims = " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
    return f"{mesh.devices.size} {'/'.join(kinds)} device(s), mesh {dims}"
