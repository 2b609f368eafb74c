"""Serving images: the BentoML image definitions (CPU and GPU) a pipeline's bento is containerized with.

The GPU image starts from NVIDIA's CUDA runtime (cuDNN included) and installs torch's CUDA build; the CPU image
is BentoML's slim Python image. Which one a pipeline gets follows from its spec (:func:`image_flavor`); the packages
are the serving runtime's plus what the pipeline's trainer (``kiln.trainers``) needs to load its model.

What `<p>/image` really builds (no registry needed) is rendered here too: :func:`containerfile` on :func:`base_image`
(Debian bookworm's python3, built locally by ``resources/containers.py``). The GPU image stays a definition only.
"""

from __future__ import annotations

import re
from pathlib import Path
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


# ------------------------------------------------------------------------------------------- built serving images
# `<p>/image` (assets/image.py) containerizes a bento with a daemonless builder (buildah, resources/containers.py) from
# a Containerfile rendered here: BentoML's layout (the bento at BENTO_PATH, BENTOML_HOME above it, the non-root
# `bentoml` user 1034, port 3000), on a base image that needs no registry: by default Debian bookworm's own python3
# (bookworm's Python is 3.11, PYTHON_VERSION) with what the runtime links against (libgomp1 for LightGBM), built
# locally with mmdebstrap. BentoML's generated Dockerfile is not used: it starts from python:3.11-slim on Docker Hub,
# installs build-essential and git with apt and fetches uv, none of which a build without a registry can reach.

BASE_SUITE = "bookworm"
BASE_PACKAGES = ("python3", "python3-venv", "python3-pip", "ca-certificates", "libgomp1")
BENTO_PATH = "/home/bentoml/bento"
BENTO_USER_UID = 1034  # BentoML's generated Dockerfile's `bentoml` user; the Kubernetes pod runs as it
CONTAINER_PORT = 3000  # BentoML's default port inside an image
VENV = "/app/.venv"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # mounted read-only at build time (pip through the host's CAs), never baked in
# BentoML creates its store's folders under BENTOML_HOME when it starts: made at build time, so the image also runs
# with a read-only root filesystem (the Kubernetes pod's securityContext; only /tmp is writable there).
BENTOML_STORE_DIRS = " ".join(f"/home/bentoml/{d}" for d in ("bentos", "envs", "models", "tmp"))
REQUIREMENTS = "requirements.txt"  # the bento's pinned packages, at the build context's root
CONTAINERFILE = "Containerfile"


def default_base_image() -> str:
    """``localhost/kiln-base:<suite>-<hash of the package list>``: a new package list names a new image."""
    import hashlib

    digest = hashlib.sha256(" ".join((BASE_SUITE, *BASE_PACKAGES)).encode()).hexdigest()[:12]
    return f"localhost/kiln-base:{BASE_SUITE}-{digest}"


def base_image() -> str:
    """``KILN_BASE_IMAGE`` (default :func:`default_base_image`): what the CPU serving image starts from."""
    from kiln import settings

    return settings.env("KILN_BASE_IMAGE", default_base_image())


def local_image(bento_tag: str) -> str:
    """The local name of a bento's serving image: ``localhost/<bento name>:<bento version>`` (lower case, as OCI wants)."""
    return f"localhost/{bento_tag.lower()}"


def bento_requirements(bento_path: str | Path) -> list[str]:
    """The bento's pinned packages (``env/python/requirements.txt``, written from :func:`python_packages` at bento build),
    plus BentoML pinned to the lock when the bento does not list it."""
    path = Path(bento_path) / "env" / "python" / "requirements.txt"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the bento has no pinned requirements (was it built by `<p>/bento`?)")
    lines = [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if "bentoml" not in {_name(line) for line in lines}:
        lines.append(pinned(["bentoml"])[0])
    return lines


def containerfile(base: str, model_tag: str) -> str:
    """The Containerfile of a CPU serving image: a venv with the bento's pinned packages (pip through the CA bundle
    mounted at build time, with a build cache), the bento with its models, served by ``bentoml serve`` as user 1034
    (with a read-only root filesystem too: BentoML's store folders exist beforehand).

    The build context holds ``requirements.txt`` and ``bento/`` (:func:`resources.containers.build_context`)."""
    return f"""\
# Rendered by Kiln (serving/images.py) from a bento: the serving image of `<p>/image`.
FROM {base}
ENV LANG=C.UTF-8 LC_ALL=C.UTF-8 PYTHONIOENCODING=UTF-8 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
RUN groupadd -g {BENTO_USER_UID} -o bentoml && useradd -m -u {BENTO_USER_UID} -g {BENTO_USER_UID} -o -r bentoml \\
 && mkdir -p {BENTOML_STORE_DIRS} && chown {BENTO_USER_UID}:{BENTO_USER_UID} {BENTOML_STORE_DIRS}
RUN python3 -m venv {VENV}
ENV VIRTUAL_ENV={VENV} PATH={VENV}/bin:$PATH
COPY {REQUIREMENTS} /app/{REQUIREMENTS}
RUN --mount=type=cache,target=/root/.cache/pip,sharing=locked \\
    PIP_CERT={CA_BUNDLE} pip install --disable-pip-version-check --no-input -r /app/{REQUIREMENTS}
ENV BENTO_PATH={BENTO_PATH} BENTOML_HOME=/home/bentoml/ BENTOML_CONTAINERIZED=true BENTOML_DO_NOT_TRACK=True \\
    BENTOML_HOST=0.0.0.0 BENTOML_PORT={CONTAINER_PORT} KILN_MODEL_TAG={model_tag}
COPY --chown={BENTO_USER_UID}:{BENTO_USER_UID} bento/ {BENTO_PATH}/
USER {BENTO_USER_UID}:{BENTO_USER_UID}
WORKDIR {BENTO_PATH}
EXPOSE {CONTAINER_PORT}
ENTRYPOINT ["bentoml", "serve", "{BENTO_PATH}"]
"""
