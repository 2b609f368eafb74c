"""Serving images: the BentoML image definitions (CPU and GPU) a pipeline's bento is containerized with.

The GPU image starts from NVIDIA's CUDA runtime (cuDNN included) and installs torch's CUDA build; the CPU image
is BentoML's slim Python image. Which one a pipeline gets follows from its spec (:func:`image_flavor`); the packages
are the serving runtime's plus what the pipeline's trainer (``kiln.trainers``) needs to load its model.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from kiln.spec import PipelineSpec
from serving.lock import pinned

if TYPE_CHECKING:
    from bentoml.images import Image

PYTHON_VERSION = "3.11"
CUDA_BASE_IMAGE = "nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04"
TORCH_REQUIREMENT = "torch==2.13.0"  # the Linux x86_64 wheel carries CUDA 12 libraries; the driver comes from the node
FLAVORS = ("cpu", "gpu")
# What the serving runtime imports besides bentoml (which a bento brings itself); the model's own library comes from
# its trainer (Trainer.serving_packages).
RUNTIME_PACKAGES = ["polars>=1", "pyarrow>=14", "numpy>=1.26", "pydantic>=2.6,<3", "pyyaml>=6", "orjson>=3.9", "httptools>=0.6",
                    "prometheus-client>=0.20"]


def image_flavor(spec: PipelineSpec) -> str:
    """``gpu`` when the endpoint asks for GPUs or its trainer wants them for serving (a torch model trained on GPUs), else ``cpu``."""
    from kiln.trainers import trainer_class

    if spec.serving.gpu > 0 or trainer_class(spec.trainer.kind).wants_gpu(spec):
        return "gpu"
    return "cpu"


def python_packages(spec: PipelineSpec) -> list[str]:
    """What the served model needs besides Kiln's own modules."""
    from kiln.trainers import trainer_class

    packages = [*RUNTIME_PACKAGES, *trainer_class(spec.trainer.kind).serving_packages(spec)]
    if image_flavor(spec) == "gpu" and _name(TORCH_REQUIREMENT) not in {_name(p) for p in packages}:
        packages.append(TORCH_REQUIREMENT)  # a GPU endpoint gets torch's CUDA build whatever trained its model
    return pinned(packages)  # the versions training used (requirements.lock)


def _name(requirement: str) -> str:
    """The distribution name of a pip requirement ('polars' of 'polars>=1')."""
    return re.split(r"[<>=!~;\[ ]", requirement, maxsplit=1)[0].strip().lower()


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
