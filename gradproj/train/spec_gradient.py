"""Run-spec checks of where the gradient comes from and what consumes it: Sophia's
curvature pass (train/curvature.py) and zeroth-order training (train/zeroth_order.py),
each against the [train] and [optimizer] choices it cannot run with.

`out` is spec.py's collector (`add(table, key, message)`, `notices`, `place`); every
problem becomes one line naming its `[table].key`.
"""
from __future__ import annotations

from .. import RESIDUALS, RULES  # noqa: F401  (importing gradproj registers built-ins)
from .checks import Issue


def int8_weights(optimizer) -> bool:
    """Whether the spec's targeted layers become INT8 weights: the q-galore preset's
    `quantize_weights`, [model.parametrization] kind = "int8", or a kind's `int8 = true`
    (SLTrain's INT8 factors)."""
    table = optimizer.parametrization or {}
    return bool(optimizer.effective.get("quantize_weights") or table.get("kind") == "int8"
                or table.get("int8") is True)


def check_curvature(effective: dict, train: dict, out, int8: bool) -> None:
    """Sophia's curvature pass (train/curvature.py): what the loop cannot run."""
    rule = effective.get("rule")
    if rule not in RULES or not RULES.get(rule).uses_curvature:
        return
    estimator = effective["curvature_estimator"]
    if train.get("gradient") == "zeroth-order":
        out.add("optimizer", "curvature_every", "the curvature pass needs backprop gradients, "
                "got [train].gradient = 'zeroth-order' (use a rule without curvature, e.g. "
                "the mezo preset's sgdm)")
    if train["parallel"] == "fsdp2" or (train["parallel"] == "ddp" and (
            train["per_layer"] or estimator == "hutchinson")):
        out.add("optimizer", "curvature_every", f"the curvature pass runs under DDP with "
                f"estimator 'gnb' in normal mode only (else single-process), got [train]."
                f"parallel = {train['parallel']!r}, per_layer = "
                f"{str(train['per_layer']).lower()}, curvature_estimator = {estimator!r}")
    if estimator == "hutchinson" and train["per_layer"]:
        out.add("optimizer", "curvature_estimator", "expected 'gnb' with [train].per_layer = "
                "true (its hooks cannot take a Hessian-vector product), got 'hutchinson'")
    if estimator == "hutchinson" and int8:
        out.add("optimizer", "curvature_estimator", "expected 'gnb' with INT8 weights "
                "(quantize_weights: no Hessian-vector product through them), got 'hutchinson'")


ZO_KEYS = ("zo_eps", "zo_perturbations", "zo_subspace")


def check_zeroth_order(train: dict, given: dict, optimizer, out) -> None:
    """`[train].gradient = "zeroth-order"`: what it cannot combine with (train/zeroth_order.py)."""
    if train["gradient"] != "zeroth-order":
        for key in ZO_KEYS:
            if key in given:
                out.add("train", key, f"is only read when [train].gradient = 'zeroth-order', "
                                      f"got gradient {train['gradient']!r}")
        return
    if train["per_layer"]:
        out.add("train", "gradient", "expected 'backprop' with per_layer = true (per-layer mode "
                                     "steps inside backward; zeroth-order has none)")
    if train["parallel"] == "fsdp2":
        out.add("train", "gradient", "expected 'backprop' with parallel = 'fsdp2' (zeroth-order "
                                     "perturbs whole weights in place; use 'ddp' or 'none')")
    if train["activation_checkpointing"]:
        out.notices.append(Issue(out.place("train", "activation_checkpointing"),
                                 "not used with zeroth-order gradients (no backward to recompute for)"))
    if train["grad_clip"] > 0:
        out.notices.append(Issue(out.place("train", "grad_clip"),
                                 f"{train['grad_clip']} is not applied with [train].gradient = "
                                 f"'zeroth-order' (MeZO does not clip its estimate)"))
    options = optimizer.effective
    if int8_weights(optimizer):
        out.add("train", "gradient", "expected 'backprop' with INT8 weights (quantize_weights, "
                                     "or [model.parametrization] kind = 'int8' / int8 = true): "
                                     "zeroth-order perturbs the weights in place")
    residual = options.get("residual")
    if (train["zo_subspace"] and residual in RESIDUALS
            and RESIDUALS.get(residual).uses_full_grad):
        out.add("train", "zo_subspace", f"expected false with residual {residual!r}, which reads "
                                        f"the full gradient; use residual = 'drop'")
