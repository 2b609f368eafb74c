"""Serving images: each bento's packages come from its trainer, pinned to the lock; GPU flavors from the spec."""

from __future__ import annotations

from importlib.metadata import version

from tests.kiln.test_trainers import _fraud_data, _spec


def test_serving_packages_come_from_the_trainer() -> None:
    from serving.images import image_flavor, python_packages

    sklearn = python_packages(_spec("sklearn"))
    assert f"scikit-learn=={version('scikit-learn')}" in sklearn  # pickles load only in the version that wrote them
    assert not any(p.startswith(("lightgbm", "torch")) for p in sklearn)
    assert any(p.startswith("lightgbm") for p in python_packages(_spec("lightgbm")))
    gpu_torch = _fraud_data(kind="torch", params={}, resources={"gpu": 1})
    from kiln.spec import PipelineSpec

    spec = PipelineSpec.model_validate(gpu_torch)
    assert image_flavor(spec) == "gpu" and any(p.startswith("torch==") for p in python_packages(spec))
    assert image_flavor(_spec("torch")) == "cpu"  # the shipped fraud spec asks for no GPU
