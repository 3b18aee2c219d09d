"""Train deterioration-gbt: gradient-boosted trees (scikit-learn) on synthetic vitals, as ONNX.

Run from the repository root, with the ``train`` dependency group installed:
``.venv/bin/python deploy/training/train_deterioration_gbt.py``. It writes, under
deploy/triton/models/deterioration-gbt/: ``1/model.onnx``, ``metrics.json`` and ``MODEL_CARD.md``
(``config.pbtxt`` beside them is written by hand). Fixed seeds and one BLAS thread: re-running
gives byte-identical files.

Data: the synthetic cohort of deploy/triton/fit_logistic.py (its ``synthetic_cohort``, imported,
not copied) with the same seed, size and 80/20 split as deterioration v2, so the held-out patients
and the AUROC are directly comparable with v2's ``holdout_auc`` (2/weights.json).

Model: ``GradientBoostingClassifier`` on the 7 raw vitals, exported by skl2onnx (no ZipMap), then
edited to the Triton contract: one input ``VITALS`` FP32 ``[batch, 7]`` (the spec's column order,
deploy/models/deterioration.yaml) and one output ``PROBABILITIES`` FP32 ``[batch, 2]`` (column 0
no deterioration, column 1 deterioration); skl2onnx's label output is dropped. The held-out
metrics are computed from the exported graph's outputs (onnxruntime), what Triton serves.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.ensemble import GradientBoostingClassifier
from threadpoolctl import threadpool_limits

from medmesh_cli.pyfiles import load_file

ROOT = Path(__file__).resolve().parents[2]
FIT_LOGISTIC = ROOT / "deploy" / "triton" / "fit_logistic.py"
NEWS2_MODEL = ROOT / "deploy" / "triton" / "models" / "deterioration" / "1" / "model.py"
MODEL_DIR = ROOT / "deploy" / "triton" / "models" / "deterioration-gbt"
ONNX_PATH = MODEL_DIR / "1" / "model.onnx"
METRICS_PATH = MODEL_DIR / "metrics.json"
CARD_PATH = MODEL_DIR / "MODEL_CARD.md"
SCRIPT = "deploy/training/train_deterioration_gbt.py"

INPUT = "VITALS"
OUTPUT = "PROBABILITIES"
COLUMNS = (
    "respiratory_rate",
    "spo2",
    "supplemental_oxygen",
    "temperature",
    "systolic_bp",
    "heart_rate",
    "not_alert",
)
# skl2onnx takes the lowest opsets its converters need, up to these.
TARGET_OPSET = {"": 17, "ai.onnx.ml": 3}
HYPERPARAMETERS: dict[str, Any] = {
    "n_estimators": 200,
    "learning_rate": 0.05,
    "max_depth": 3,
    "subsample": 0.8,
    "min_samples_leaf": 20,
    "random_state": 20171219,
}
# The exported probabilities must equal scikit-learn's up to float32 rounding.
ONNX_TOLERANCE = 1e-5


def cohort() -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """(vitals [n, 7], outcome [n], held-out mask [n]): exactly fit_logistic.fit's draw and split."""
    fit_logistic = load_file(FIT_LOGISTIC, "fit_logistic")
    n = int(fit_logistic.N_PATIENTS)
    rng = np.random.default_rng(fit_logistic.SEED)
    vitals, outcome = fit_logistic.synthetic_cohort(rng, n)
    holdout = rng.permutation(n) < round(fit_logistic.HOLDOUT_FRACTION * n)
    return (
        np.asarray(vitals, dtype=np.float64),
        np.asarray(outcome, dtype=np.float64),
        np.asarray(holdout, dtype=np.bool_),
    )


def auroc(score: npt.NDArray[Any], outcome: npt.NDArray[Any]) -> float:
    """Area under the ROC curve (fit_logistic's Mann-Whitney estimate, ties counted half)."""
    return float(load_file(FIT_LOGISTIC, "fit_logistic").auc(score, outcome))


def to_onnx(model: GradientBoostingClassifier) -> onnx.ModelProto:
    """The fitted model as ONNX, edited to one ``VITALS`` input and one ``PROBABILITIES`` output."""
    exported: onnx.ModelProto = convert_sklearn(
        model,
        name="deterioration-gbt",
        initial_types=[(INPUT, FloatTensorType([None, len(COLUMNS)]))],
        options={id(model): {"zipmap": False}},
        target_opset=TARGET_OPSET,
    )
    graph = exported.graph
    (probabilities,) = (o for o in graph.output if o.name == "probabilities")
    for node in graph.node:
        node.output[:] = [OUTPUT if o == probabilities.name else o for o in node.output]
        node.input[:] = [OUTPUT if i == probabilities.name else i for i in node.input]
    del graph.output[:]
    graph.output.append(
        onnx.helper.make_tensor_value_info(OUTPUT, onnx.TensorProto.FLOAT, ["batch", 2])
    )
    del graph.input[:]
    graph.input.append(
        onnx.helper.make_tensor_value_info(INPUT, onnx.TensorProto.FLOAT, ["batch", len(COLUMNS)])
    )
    graph.name = "deterioration_gbt"
    # skl2onnx lists the opsets in set order, which varies with Python's string hash seed.
    opsets = sorted((o.domain, o.version) for o in exported.opset_import)
    del exported.opset_import[:]
    exported.opset_import.extend(onnx.helper.make_opsetid(d, v) for d, v in opsets)
    exported.doc_string = f"deterioration-gbt, trained by {SCRIPT} on synthetic data"
    onnx.checker.check_model(exported, full_check=True)
    return exported


def run_onnx(model: onnx.ModelProto, vitals: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
    """PROBABILITIES of the graph for ``vitals`` (onnxruntime, CPU)."""
    session = onnxruntime.InferenceSession(
        model.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    (out,) = session.run([OUTPUT], {INPUT: vitals.astype(np.float32)})
    return np.asarray(out, dtype=np.float32)


def main() -> None:
    """Draw the cohort, fit, export, check and write model.onnx, metrics.json and MODEL_CARD.md."""
    started = time.perf_counter()
    vitals, outcome, holdout = cohort()
    train_x, train_y = vitals[~holdout], outcome[~holdout]
    test_x, test_y = vitals[holdout], outcome[holdout]
    with threadpool_limits(limits=1):
        model = GradientBoostingClassifier(**HYPERPARAMETERS)
        model.fit(train_x.astype(np.float32), train_y.astype(np.int64))
        reference = model.predict_proba(test_x.astype(np.float32))
    exported = to_onnx(model)
    probabilities = run_onnx(exported, test_x)
    difference = float(np.max(np.abs(probabilities - reference)))
    if difference > ONNX_TOLERANCE:
        raise RuntimeError(f"ONNX and scikit-learn differ by {difference:.2e}")
    ONNX_PATH.parent.mkdir(parents=True, exist_ok=True)
    ONNX_PATH.write_bytes(exported.SerializeToString())
    seconds = time.perf_counter() - started

    p = probabilities[:, 1].astype(np.float64)
    news2 = load_file(NEWS2_MODEL, "deterioration_v1_model").news2
    news2_total = np.asarray(news2(test_x)[0][:, 0], dtype=np.float64)
    eps = 1e-7
    metrics: dict[str, Any] = {
        "auroc": auroc(p, test_y),
        "auroc_news2": auroc(news2_total, test_y),
        "brier": float(np.mean((p - test_y) ** 2)),
        "log_loss": float(-np.mean(test_y * np.log(p + eps) + (1 - test_y) * np.log(1 - p + eps))),
        "accuracy": float(np.mean((p >= 0.5) == (test_y == 1))),
        "prevalence": float(test_y.mean()),
        "mean_predicted": float(p.mean()),
        "onnx_max_abs_diff": difference,
    }
    metrics = {k: round(v, 4) for k, v in metrics.items()}
    metrics |= {
        "train_rows": int(train_x.shape[0]),
        "test_rows": int(test_x.shape[0]),
        "training_script": SCRIPT,
        "sha256": hashlib.sha256(ONNX_PATH.read_bytes()).hexdigest(),
    }
    METRICS_PATH.write_text(json.dumps(metrics, indent=2) + "\n")
    CARD_PATH.write_text(model_card(metrics, exported, float(train_y.mean())))
    print(f"wrote {ONNX_PATH.relative_to(ROOT)} ({ONNX_PATH.stat().st_size} bytes)")
    print(f"  sha256 {metrics['sha256']}")
    for name in ("auroc", "auroc_news2", "brier", "accuracy", "prevalence"):
        print(f"  {name:<12} {metrics[name]}")
    print(f"trained and exported in {seconds:.1f} s")


def model_card(metrics: dict[str, Any], exported: onnx.ModelProto, train_prevalence: float) -> str:
    """MODEL_CARD.md: what the model is for, what it was trained on, how well, and its limits."""
    v2_weights = ROOT / "deploy" / "triton" / "models" / "deterioration" / "2" / "weights.json"
    v2_auc = round(float(json.loads(v2_weights.read_text())["holdout_auc"]), 4)
    opsets = ", ".join(f"{o.domain or 'ai.onnx'} {o.version}" for o in exported.opset_import)
    parameters = ", ".join(f"{k}={v}" for k, v in HYPERPARAMETERS.items())
    columns = ", ".join(f"{i} {c}" for i, c in enumerate(COLUMNS))
    return f"""# Model card: deterioration-gbt (version 1)

Written by `{SCRIPT}`; do not edit by hand (re-run the script).

## Intended use

A demonstration of a framework-trained model (scikit-learn, exported to ONNX) served by Triton's
`onnxruntime_onnx` platform through the same plugin contract as `deterioration` (model spec
deploy/models/deterioration.yaml): the probability that a patient deteriorates, from one set of
vital signs. For testing the medmesh pipeline only; **not** for clinical decisions.

## Interface

- Input `{INPUT}` FP32 `[batch, 7]`, the spec's column order: {columns}
  (units as in the spec: /min, %, 1 = on oxygen, Cel, mm[Hg], /min, 1 = CVPU).
- Output `{OUTPUT}` FP32 `[batch, 2]`: column 0 no deterioration, column 1 deterioration; each
  row sums to 1.
- ONNX opsets: {opsets}; ONNX IR version {exported.ir_version}.

## Training data

Synthetic only: the cohort of `deploy/triton/fit_logistic.py` (`synthetic_cohort`, seed and size
as there), one row of vitals per patient: 75 % "stable" and 25 % "unwell" patients with shifted
vital-sign distributions, and an outcome drawn as
`P(deteriorate) = sigmoid(-4.5 + 0.55 * NEWS2 + u)`, `u ~ N(0, 0.5)`. The split is
deterioration v2's: {metrics["train_rows"]} training rows (outcome rate {train_prevalence:.4f}),
{metrics["test_rows"]} held-out rows.

## Model

scikit-learn `GradientBoostingClassifier` ({parameters}) on the 7 raw vitals, exported with
skl2onnx (ZipMap off; label output removed).

## Held-out metrics ({metrics["test_rows"]} synthetic patients)

| metric | value |
|---|---|
| AUROC | {metrics["auroc"]} |
| AUROC of the NEWS2 total on the same patients (baseline) | {metrics["auroc_news2"]} |
| Brier score | {metrics["brier"]} |
| Log loss | {metrics["log_loss"]} |
| Accuracy at 0.5 | {metrics["accuracy"]} |
| Prevalence (outcome rate) | {metrics["prevalence"]} |
| Mean predicted probability | {metrics["mean_predicted"]} |
| Largest difference ONNX vs scikit-learn | {metrics["onnx_max_abs_diff"]} |

On the same held-out patients, deterioration v2 (logistic regression on deviation features)
has an AUROC of {v2_auc} (`holdout_auc` in deploy/triton/models/deterioration/2/weights.json).
The outcome was drawn from the NEWS2 total itself, so NEWS2 is close to the best achievable score
here; the trees see only the raw vitals and learn NEWS2's bands from the training rows.

## Limitations

- Trained and evaluated on synthetic data only, drawn from a process that is itself built on
  NEWS2: it can at best rediscover NEWS2 and says nothing about real patients. Not clinically
  validated; no real patient data were used.
- Accuracy at 0.5 is dominated by the low prevalence: a model that always says "no
  deterioration" scores {1 - metrics["prevalence"]:.4f}.
- Tree ensembles are piecewise constant and do not extrapolate: vitals outside the synthetic
  ranges get the probability of the nearest range edge.
- No calibration check beyond the Brier score; no subgroup analysis (the synthetic data have no
  demographics).

## Reproduce

`.tools/uv/bin/uv sync --group train`, then `.venv/bin/python {SCRIPT}`: byte-identical output
(sha256 `{metrics["sha256"]}`).
"""


if __name__ == "__main__":
    main()
