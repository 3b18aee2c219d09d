"""Fit the weights of deterioration v2 (logistic regression) on a synthetic cohort.

Run from the repository root:  python deploy/triton/fit_logistic.py
It writes deploy/triton/models/deterioration/2/weights.json. numpy only, fixed seed,
deterministic: re-running with the same seed and size gives the same weights.

The synthetic cohort (``synthetic_cohort``), one row of vitals per patient, in the VITALS
column order of the model spec:

- Each patient is "stable" (75 %) or "unwell" (25 %); unwell patients have shifted, wider
  distributions. Readings are rounded like charted observations (integers; temperature to 0.1).

  =====================  ==========================  ==========================
  vital                  stable                      unwell
  =====================  ==========================  ==========================
  respiratory rate /min  N(16, 2.5) in [6, 45]       N(21, 6) in [4, 50]
  SpO2 %                 N(97.5, 1.5) in [85, 100]   N(93, 4) in [60, 100]
  supplemental oxygen    Bernoulli(0.05)             Bernoulli(0.40)
  temperature Cel        N(36.8, 0.4) in [34, 41]    N(37.5, 1.3) in [32, 42]
  systolic BP mm[Hg]     N(128, 16) in [70, 240]     N(112, 30) in [50, 260]
  heart rate /min        N(78, 12) in [35, 180]      N(102, 24) in [25, 200]
  not alert (CVPU)       Bernoulli(0.01)             Bernoulli(0.15)
  =====================  ==========================  ==========================

- Outcome (deterioration within the horizon), drawn per patient:
  ``P(deteriorate) = sigmoid(-4.5 + 0.55 * NEWS2 + u)`` with ``u ~ N(0, 0.5)``, an unobserved
  per-patient frailty; NEWS2 is version 1's score (models/deterioration/1/model.py).

The fit: the features of version 2 (models/deterioration/2/model.py, ``features``), an
unpenalised intercept and an L2 penalty ``L2 / 2 * |coefficients|^2`` on the rest, maximised by
Newton's method (iteratively reweighted least squares) on a random 80 % of the cohort; the AUC
is measured on the held-out 20 %.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from medmesh_cli.pyfiles import load_file

HERE = Path(__file__).resolve().parent
MODEL_DIR = HERE / "models" / "deterioration"
WEIGHTS_PATH = MODEL_DIR / "2" / "weights.json"

SEED = 20171219  # NEWS2 update published December 2017
N_PATIENTS = 20_000
HOLDOUT_FRACTION = 0.2
L2 = 1.0
INTERCEPT_TRUE = -4.5
NEWS2_SLOPE_TRUE = 0.55
FRAILTY_SD = 0.5
UNWELL_FRACTION = 0.25


def _normal(
    rng: np.random.Generator,
    unwell: npt.NDArray[Any],
    stable: tuple[float, float, float, float],
    ill: tuple[float, float, float, float],
    decimals: int = 0,
) -> npt.NDArray[Any]:
    """Per patient, N(mean, sd) clipped to [low, high] by group, rounded to ``decimals``."""
    n = unwell.shape[0]
    values = np.where(
        unwell,
        np.clip(rng.normal(ill[0], ill[1], n), ill[2], ill[3]),
        np.clip(rng.normal(stable[0], stable[1], n), stable[2], stable[3]),
    )
    return np.round(values, decimals)


def synthetic_cohort(rng: np.random.Generator, n: int) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """(vitals float64 [n, 7], outcome 0/1 [n]) drawn as the module doc describes."""
    news2 = load_file(MODEL_DIR / "1" / "model.py", "deterioration_v1_model").news2
    unwell = rng.random(n) < UNWELL_FRACTION
    vitals = np.stack(
        [
            _normal(rng, unwell, (16, 2.5, 6, 45), (21, 6, 4, 50)),
            _normal(rng, unwell, (97.5, 1.5, 85, 100), (93, 4, 60, 100)),
            (rng.random(n) < np.where(unwell, 0.40, 0.05)).astype(np.float64),
            _normal(rng, unwell, (36.8, 0.4, 34, 41), (37.5, 1.3, 32, 42), decimals=1),
            _normal(rng, unwell, (128, 16, 70, 240), (112, 30, 50, 260)),
            _normal(rng, unwell, (78, 12, 35, 180), (102, 24, 25, 200)),
            (rng.random(n) < np.where(unwell, 0.15, 0.01)).astype(np.float64),
        ],
        axis=1,
    )
    total = news2(vitals)[0][:, 0].astype(np.float64)
    log_odds = INTERCEPT_TRUE + NEWS2_SLOPE_TRUE * total + rng.normal(0.0, FRAILTY_SD, n)
    outcome = (rng.random(n) < 1.0 / (1.0 + np.exp(-log_odds))).astype(np.float64)
    return vitals, outcome


def fit_irls(
    x: npt.NDArray[Any], y: npt.NDArray[Any], l2: float, iterations: int = 50
) -> npt.NDArray[Any]:
    """L2-penalised logistic regression by Newton/IRLS; returns [intercept, coefficients...]."""
    design = np.hstack([np.ones((x.shape[0], 1)), x])
    penalty = np.full(design.shape[1], l2)
    penalty[0] = 0.0  # the intercept is not penalised
    beta = np.zeros(design.shape[1])
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(design @ beta)))
        gradient = design.T @ (y - p) - penalty * beta
        hessian = (design * (p * (1.0 - p))[:, None]).T @ design + np.diag(penalty)
        step = np.linalg.solve(hessian, gradient)
        beta = beta + step
        if np.max(np.abs(step)) < 1e-10:
            break
    return beta


def auc(score: npt.NDArray[Any], outcome: npt.NDArray[Any]) -> float:
    """Area under the ROC curve (Mann-Whitney U, ties counted half)."""
    order = np.argsort(score, kind="mergesort")
    ranks = np.empty(len(score))
    sorted_scores = score[order]
    # average ranks over ties
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0
    ranks[order] = np.repeat(average, counts)
    positives = outcome == 1
    n_pos = int(positives.sum())
    n_neg = len(outcome) - n_pos
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def fit(seed: int = SEED, n: int = N_PATIENTS) -> dict[str, Any]:
    """Draw the cohort, fit, and return the content of weights.json."""
    v2 = load_file(MODEL_DIR / "2" / "model.py", "deterioration_v2_model")
    rng = np.random.default_rng(seed)
    vitals, outcome = synthetic_cohort(rng, n)
    x = v2.features(vitals)
    holdout = rng.permutation(n) < round(HOLDOUT_FRACTION * n)
    beta = fit_irls(x[~holdout], outcome[~holdout], L2)
    coefficients = [round(float(b), 6) for b in beta[1:]]
    intercept = round(float(beta[0]), 6)
    held_out_score = v2.predict(vitals[holdout], np.asarray(coefficients), intercept)[0][:, 0]
    return {
        "model": "deterioration",
        "version": 2,
        "algorithm": "L2-penalised logistic regression (Newton/IRLS) on deviation features",
        "features": list(v2.FEATURE_NAMES),
        "feature_columns": [column for _, column in v2.FEATURES],
        "coefficients": coefficients,
        "intercept": intercept,
        "l2": L2,
        "seed": seed,
        "n": n,
        "n_train": int((~holdout).sum()),
        "n_holdout": int(holdout.sum()),
        "outcome_rate": round(float(outcome.mean()), 6),
        "holdout_auc": round(auc(held_out_score.astype(np.float64), outcome[holdout]), 6),
        "generative_process": (
            f"P(deteriorate) = sigmoid({INTERCEPT_TRUE} + {NEWS2_SLOPE_TRUE} * NEWS2 + u), "
            f"u ~ N(0, {FRAILTY_SD}); {UNWELL_FRACTION:.0%} unwell patients "
            "(see deploy/triton/fit_logistic.py)"
        ),
    }


def main() -> None:
    """Fit with the fixed seed and write weights.json."""
    weights = fit()
    WEIGHTS_PATH.write_text(json.dumps(weights, indent=2) + "\n")
    print(f"wrote {WEIGHTS_PATH}")
    for name, coefficient in zip(weights["features"], weights["coefficients"], strict=True):
        print(f"  {name:<14} {coefficient:+.4f}")
    print(f"  intercept      {weights['intercept']:+.4f}")
    print(f"held-out AUC {weights['holdout_auc']:.3f} on {weights['n_holdout']} patients")


if __name__ == "__main__":
    main()
