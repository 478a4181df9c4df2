"""The SFT objectives: how a step's records and their train_weights become one loss.

Every objective is a weighted sum of per-token cross-entropies divided by a
per-step normaliser, so it can be computed inside packed rows and accumulated
over micro-batches and devices exactly like one big batch:

    loss = Σ_t c_t · CE_t / D

For a step with records r = 1..N (train_weight w_r, n_r assistant tokens after
truncation, meanCE_r = Σ_{t∈r} CE_t / n_r):

- ``record``    (default)  c_t = w_r / n_r,        D = Σ_r w_r
                 → Σ_r w_r · meanCE_r / Σ_r w_r: the χ² policy's weights, each record
                 weighted as a whole (a long trajectory does not outweigh a short one).
- ``reference`` c_t = [w_r > 0] / n_r,  D = N (zero-weight records included)
                 → (1/N) Σ_r [w_r > 0] · meanCE_r: what the published runs optimise
                 (one record per device, no packing, Σ w·CE / Σ w per record, so the
                 weight cancels; a zero-weight record still takes its slot in the step).
- ``token``     c_t = w_r,              D = Σ_t w_t
                 → Σ_t w·CE / Σ_t w over all assistant tokens: long trajectories weigh
                 more (lark-jax's objective before 0.2).

The coefficients are computed on the host once per record; ``D`` is computed
on the host per step, so accumulation order, micro-batch size and device
count do not change the loss beyond float rounding.
"""

from __future__ import annotations

OBJECTIVES = ("record", "reference", "token")


def token_coefficient(weight: float, n_targets: int, objective: str) -> float:
    """c_t for every assistant token of one record (0 means: not computed at all)."""
    if objective == "record":
        return weight / n_targets
    if objective == "reference":
        return (1.0 if weight > 0 else 0.0) / n_targets
    if objective == "token":
        return float(weight)
    raise ValueError(f"unknown objective {objective!r}")


def step_normaliser(weights, n_targets, objective: str) -> float:
    """D of one step from its records' train_weights and assistant-token counts."""
    if objective == "record":
        return float(sum(weights))
    if objective == "reference":
        return float(len(weights))
    if objective == "token":
        return float(sum(w * n for w, n in zip(weights, n_targets, strict=True)))
    raise ValueError(f"unknown objective {objective!r}")
