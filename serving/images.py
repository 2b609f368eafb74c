"""Serving images: the BentoML image definitions (CPU and GPU) a pipeline's bento is containerized with.

The GPU image starts from NVIDIA's CUDA runtime (cuDNN included) and installs torch's CUDA build; the CPU image
is BentoML's slim Python image. Which one a pipeline gets follows from its spec (:func:`image_flavor`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiln.spec import PipelineSpec

if TYPE_CHECKING:
    from bentoml.images import Image

PYTHON_VERSION = "3.11"
CUDA_BASE_IMAGE = "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04"
TORCH_REQUIREMENT = "torch==2.13.0"  # the Linux x86_64 wheel carries CUDA 12 libraries; the driver comes from the node
FLAVORS = ("cpu", "gpu")


def image_flavor(spec: PipelineSpec) -> str:
    """``gpu`` when the endpoint asks for GPUs or serves a torch model trained on GPUs, else ``cpu``."""
    if spec.serving.gpu > 0 or (spec.trainer.kind == "torch" and spec.trainer.resources.gpu > 0):
        return "gpu"
    return "cpu"


def python_packages(spec: PipelineSpec) -> list[str]:
    """What the served model needs besides Kiln's own modules."""
    from assets.bento import SERVING_PACKAGES

    packages = list(SERVING_PACKAGES)
    if spec.trainer.kind == "torch" or image_flavor(spec) == "gpu":
        packages.append(TORCH_REQUIREMENT)
    if spec.trainer.kind == "torch":
        packages.append("mlflow>=3,<4")  # assets.predictors loads the pt2 program through mlflow.pytorch
    return packages


def image_for(spec: PipelineSpec) -> Image:
    """The BentoML image of a pipeline's bento."""
    from bentoml.images import Image

    if image_flavor(spec) == "cpu":
        image = Image(python_version=PYTHON_VERSION, lock_python_packages=False)
    else:
        # CUDA images ship without pip; BentoML's Dockerfile needs `uv` before it creates the app's venv.
        image = (Image(base_image=CUDA_BASE_IMAGE, python_version=PYTHON_VERSION, lock_python_packages=False)
                 .system_packages("python3-pip")
                 .run("pip install --break-system-packages uv"))
    return image.python_packages(*python_packages(spec))


def build_options(spec: PipelineSpec) -> dict[str, dict[str, object]]:
    """The ``docker`` and ``python`` options of ``bentoml.bentos.build`` for the pipeline's image flavor.

    The bento is built from one generic service, so the image is chosen here rather than in a service decorator:
    CPU bentos use BentoML's slim Python base; GPU bentos BentoML's CUDA base (the same CUDA and cuDNN runtime as
    :data:`CUDA_BASE_IMAGE`) with torch's CUDA build."""
    docker: dict[str, object] = {"python_version": PYTHON_VERSION}
    if image_flavor(spec) == "gpu":
        docker["cuda_version"] = CUDA_BASE_IMAGE.split(":")[1].split("-")[0]
    return {"docker": docker, "python": {"packages": python_packages(spec), "lock_packages": False}}
