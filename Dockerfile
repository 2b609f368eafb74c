# Kiln code-location image: the Dagster code server for platform_defs.definitions (gRPC on port 4000).
# The same image runs launched runs (K8sRunLauncher / Dagster+ hybrid agent), so it carries the ML stack; torch is the
# CPU wheel by default (build arg TORCH_INDEX), which keeps the image free of CUDA libraries.
#
#   docker build -t kiln-code-location:dev .
#   docker run --rm -p 4000:4000 kiln-code-location:dev
#   probe: `dagster api grpc-health-check -p 4000` (the HEALTHCHECK below; use it as the k8s exec readiness probe)

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
# CPU wheels by default; for a GPU variant (torch trainers on GPU nodes) pass the CUDA index of the pinned torch,
# e.g. --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu<NNN>
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH
WORKDIR /src
RUN python -m venv /opt/venv

# Dependencies first, from pyproject.toml and requirements.lock alone: this layer is rebuilt only when the dependency
# list or the lock changes, not on every pipeline-spec or code change. Every install takes the lock as constraints,
# so the image carries exactly the versions CI tested and bentos pin. The `torch` extra comes from TORCH_INDEX
# (CPU wheels: no CUDA libraries, ~4 GB smaller) without its dependencies, which then come from PyPI at the locked versions.
COPY pyproject.toml requirements.lock ./
RUN python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; torch = p['optional-dependencies']['torch']; \
open('torch.txt', 'w').write('\n'.join(torch)); open('requirements.txt', 'w').write('\n'.join(p['dependencies'] + torch))" \
 && pip install --no-deps --index-url "${TORCH_INDEX}" -c requirements.lock -r torch.txt \
 && pip install -c requirements.lock -r requirements.txt \
 && pip check

# Then the code: only Kiln's packages (see .dockerignore), installed without touching the dependency layer. The lock
# ships beside serving/lock.py (package data), so bentos built in this image pin the same versions.
COPY README.md ./
COPY kiln ./kiln
COPY platform_defs ./platform_defs
COPY assets ./assets
COPY resources ./resources
COPY sensors ./sensors
COPY serving ./serving
RUN cp requirements.lock serving/ \
 && pip install --no-deps . \
 && python -P -c "import platform_defs.definitions as d; print(len(list(d.defs.assets or [])), 'assets load from the installed package')" \
 && python -P -c "from serving.lock import pinned; print('bentos pin', *pinned(['polars', 'lightgbm']))"

FROM ${PYTHON_IMAGE} AS runtime
# LightGBM's wheel links OpenMP at run time; buildah builds serving images in `<p>/image`'s step pod (chroot isolation,
# vfs storage: see kiln/steps.py IMAGE_BUILD_CONFIG); nothing else is installed and apt lists are removed.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 buildah \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 kiln \
 && useradd --uid 10001 --gid kiln --create-home --home-dir /home/kiln kiln \
 && mkdir -p /opt/dagster/dagster_home \
 && chown -R kiln:kiln /opt/dagster
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    DAGSTER_HOME=/opt/dagster/dagster_home \
    KILN_PROFILE=prod \
    BENTOML_HOME=/home/kiln/bentoml \
    BENTOML_DO_NOT_TRACK=True
WORKDIR /home/kiln
USER 10001:10001
EXPOSE 4000
HEALTHCHECK --interval=30s --timeout=10s --start-period=60s --retries=3 \
    CMD ["dagster", "api", "grpc-health-check", "-p", "4000"]
CMD ["dagster", "code-server", "start", "-h", "0.0.0.0", "-p", "4000", "-m", "platform_defs.definitions"]
