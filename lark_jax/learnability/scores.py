"""From per-trajectory sums to the reference's scores (method.md steps 1-2).

Per trajectory k with T_k scored tokens:

    L_k = Σ ce / T_k,   Brier_k = Σ brier / T_k,   ρ_k = Brier_k / L_k  (0 if L_k <= 1e-12)

Per problem, with W = Σ_i L_i over its scored candidates:

    ĝ_k = (L_k / W) · (2 ρ_k − Σ_i ρ_i L_i / W)                        (NaN if W <= 1e-12)

Extra fields: RSR = Σ rank / Σ ce (lower is better), mean_rank = Σ rank / T.
With the gradient estimator, ρ_k = ‖∇_θ L_k‖² / L_k instead (``rho_proxy`` keeps Brier/L).
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np

EPS = 1e-12


def trajectory_stats(row: dict, brier: str = "topk", estimator: str = "proxy") -> dict:
    t = row["tokens"]
    loss = row["ce"] / t
    b_topk, b_full = row["brier_topk"] / t, row["brier_full"] / t
    b = b_topk if brier == "topk" else b_full
    rho_proxy = b / loss if loss > EPS else 0.0
    out = {
        "candidate_id": row["candidate_id"],
        "teacher": row["teacher"],
        "L": loss,
        "Brier": b,
        "rho": rho_proxy,
        "tokens": int(t),
        "brier_topk": b_topk,
        "brier_full": b_full,
        "rsr": row["rank"] / row["ce"] if row["ce"] > EPS else math.inf,
        "mean_rank": row["rank"] / t,
    }
    if "pool_line" in row:  # the record's line in the pool: select's tie order
        out["pool_line"] = row["pool_line"]
    if "source_id" in row:  # the pool's own problem id (a uuid, ...)
        out["source_id"] = row["source_id"]
    if "correct" in row:  # the pool's verifier verdict, 1 or 0
        out["correct"] = row["correct"]
    if estimator == "gradient":
        # The exact rates of both losses: rate_mean = ‖∇θL‖²/L (the mean loss: the record
        # and reference objectives) and rate_sum = T·‖∇θL‖²/L = ‖∇θΣCE‖²/ΣCE (the summed
        # loss: the token objective, and what the proxy Brier/L stands for).
        rate_mean = row["grad_sq"] / loss if loss > EPS else 0.0
        out["grad_sq"] = row["grad_sq"]
        out["rho_proxy"] = rho_proxy
        out["rho"] = rate_mean
        out["rate_mean"] = rate_mean
        out["rate_sum"] = t * rate_mean
    return out


def g_hat(losses: np.ndarray, rhos: np.ndarray) -> np.ndarray:
    """ĝ for the candidates of one problem (float64)."""
    losses = np.asarray(losses, np.float64)
    rhos = np.asarray(rhos, np.float64)
    w = losses.sum()
    if w <= EPS:
        return np.full(losses.shape, np.nan)
    return (losses / w) * (2.0 * rhos - (rhos * losses).sum() / w)


def build_scores(rows: list[dict], brier: str = "topk",
                 estimator: str = "proxy") -> dict[str, list[dict]]:
    """{str(problem_id): [per-candidate dict ...]} sorted by problem, then by position in
    the pool file (as the reference's scorer lists them), candidate id where unknown."""
    by_problem: dict[int, list[dict]] = defaultdict(list)
    for row in rows:
        by_problem[row["problem_id"]].append(trajectory_stats(row, brier, estimator))
    out = {}
    for pid in sorted(by_problem):
        cands = sorted(by_problem[pid],
                       key=lambda r: (r.get("pool_line", math.inf), r["candidate_id"]))
        g = g_hat(np.array([c["L"] for c in cands]), np.array([c["rho"] for c in cands]))
        for c, gk in zip(cands, g, strict=True):
            c["g_hat"] = float(gk)
        out[str(pid)] = cands
    return out
