"""``--calibrate temperature``: temperature scaling fitted on validation (Guo et al. 2017).

One temperature T for the run (every member alike) minimises the validation log loss of the
members' mean ``sigmoid(z / T)``, ``z`` each member's PNEUMONIA logit. It is written into the
head itself (the PNEUMONIA unit's kernel and bias of ``dense_1`` divided by T), so the saved
model outputs calibrated probabilities and ``evaluate``, ``predict``, ``explain`` and
``adapt`` need nothing more. One model's ranking (AUC) and its labels at the validation
threshold do not change; the threshold is chosen after scaling.
"""

from __future__ import annotations

import numpy as np

LOG_T_BOUNDS = (-3.0, 3.0)  # T in [0.05, 20]


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """The T minimising the log loss of the members' mean ``sigmoid(logits / T)`` on
    ``labels``; ``logits`` (n, members) are the PNEUMONIA logits."""
    from scipy.optimize import minimize_scalar  # noqa: PLC0415

    z = np.asarray(logits, np.float64)
    y = np.asarray(labels, np.float64)
    if z.ndim == 1:
        z = z[:, None]

    def log_loss(log_t):
        p = np.clip((1.0 / (1.0 + np.exp(-z / np.exp(log_t)))).mean(1), 1e-12, 1 - 1e-12)
        return -np.mean(y * np.log(p) + (1 - y) * np.log1p(-p))

    result = minimize_scalar(log_loss, bounds=LOG_T_BOUNDS, method="bounded")
    return float(np.exp(result.x))


def scale_head(variables: dict, temperature: float) -> dict:
    """A member's variables (or members stacked on a leading axis) with the PNEUMONIA unit of
    ``dense_1`` divided by ``temperature``."""
    head = variables["params"]["dense_1"]
    kernel = np.array(head["kernel"], np.float32, copy=True)
    bias = np.array(head["bias"], np.float32, copy=True)
    kernel[..., 1] /= np.float32(temperature)
    bias[..., 1] /= np.float32(temperature)
    params = {**variables["params"], "dense_1": {**head, "kernel": kernel, "bias": bias}}
    return {**variables, "params": params}
