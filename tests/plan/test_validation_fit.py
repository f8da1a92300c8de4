"""tools/validate_planner.py --fit: the heap-slack constants are recovered from measurements, and no
fitted point is left under-predicted by more than the tool's limit."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import validate_planner  # noqa: E402

NAMES = ["saved", "recompute", "fixed"]


def synthetic(noise: float):
    generator = np.random.default_rng(0)
    points = 30
    features = np.stack([generator.uniform(1e8, 2e9, points), generator.uniform(0, 1e9, points) * (generator.random(points) < 0.5),
                         np.ones(points)], 1)
    other = generator.uniform(2e8, 3e9, points)
    truth = np.array([0.7, 0.45, 8e7])
    measured = (other + features @ truth) * (1 + generator.uniform(-noise, noise, points))
    return other, features, measured, truth


def test_fit_recovers_the_constants_of_exact_measurements():
    other, features, measured, truth = synthetic(noise=0.0)
    fitted = validate_planner.fit_constants(NAMES, other, features, measured)
    values = np.array([fitted[name] for name in NAMES])
    assert np.allclose(values, truth, rtol=1e-3)
    assert np.abs((other + features @ values) / measured - 1).max() < 1e-4


def test_fit_keeps_every_point_within_the_under_prediction_limit():
    other, features, measured, _ = synthetic(noise=0.08)
    fitted = validate_planner.fit_constants(NAMES, other, features, measured)
    errors = (other + features @ np.array([fitted[name] for name in NAMES])) / measured - 1
    assert errors.min() >= -validate_planner.FIT_UNDER_LIMIT - 1e-9
    assert all(value >= 0 for value in fitted.values())
    assert np.median(np.abs(errors)) < 0.08


def test_fit_refuses_when_a_point_stays_under_the_limit():
    # The second point has no slack term to raise: it is 20% under whatever the constant.
    with pytest.raises(SystemExit, match="within 5% under"):
        validate_planner.fit_constants(["fixed"], np.array([0.0, 80.0]), np.array([[1.0], [0.0]]), np.array([100.0, 100.0]))
