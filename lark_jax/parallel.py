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


def data_sharding(mesh, ndim: int, axis: int = 0) -> NamedSharding:
    """Split the batch axis (``axis``) as ``SHARDING_RULES["batch"]`` says, replicate the rest."""
    spec = [None] * ndim
    spec[axis] = SHARDING_RULES["batch"]["batch"]
    return NamedSharding(mesh, P(*spec))


# Which mesh axis each logical axis (models.params) may be split over, per mode. A weight is
# split along its first dimension whose logical axis the mode maps to a mesh axis of size > 1
# that divides it; otherwise it is replicated. (One split per weight, so no mesh axis is
# used twice.)
SHARDING_RULES: dict[str, dict[str, str]] = {
    # Megatron-style tensor parallelism for scoring and generation: column-parallel
    # q/k/v/gate/up, row-parallel o/down, vocab-parallel embedding and head.
    "model": {"vocab": "model", "heads": "model", "kv_heads": "model", "mlp": "model"},
    # FSDP training: every weight split over the data axis along its first dimension
    # after the layer axis that the data-parallel width divides.
    "fsdp": {a: "data" for a in ("vocab", "embed", "heads", "kv_heads", "mlp", "head_dim")},
    # Activations and caches: the batch (rows, decoding slots) over the data axis.
    "batch": {"batch": "data"},
}


def logical_sharding(mesh, axes: tuple[str | None, ...], shape: tuple[int, ...],
                     mode: str) -> NamedSharding:
    """The ``NamedSharding`` of an array with logical ``axes`` under ``SHARDING_RULES[mode]``."""
    rules = SHARDING_RULES[mode]
    for dim, (name, size) in enumerate(zip(axes, shape, strict=True)):
        mesh_axis = rules.get(name) if name else None
        n = mesh.shape.get(mesh_axis, 1) if mesh_axis else 1
        if n > 1 and size % n == 0:
            spec = [None] * len(shape)
            spec[dim] = mesh_axis
            return NamedSharding(mesh, P(*spec))
    return replicated(mesh)


def mesh_summary(mesh) -> str:
    kinds = sorted({d.platform for d in np.asarray(mesh.devices).flat})
    dims = " x ".join(f"{k}={v}" for k, v in mesh.shape.items())
    return f"{mesh.devices.size} {'/'.join(kinds)} device(s), mesh {dims}"
