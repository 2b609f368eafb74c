"""Serving images built and run without a daemon: buildah builds, podman runs, the base image comes from the OS.

No container registry is needed on a build machine: the default base image (``serving.images.default_base_image``)
is Debian bookworm's python3 made with ``mmdebstrap`` and ``podman import``, built once and reused. A bento becomes
an image with ``buildah build`` (chroot isolation, host network, the host's CA bundle mounted read-only so pip reaches
the package index through it; never baked in) from the Containerfile ``serving/images.py`` renders; a prod build
then ``buildah push``es it to ``KILN_IMAGE_REGISTRY``. A built image runs with ``podman run`` as a local endpoint
(``KILN_ENDPOINT_TARGET=container``). Every command line is built by a function of its own, so tests check what would
run (a push needs a registry) without running it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from serving import images

TOOLS = ("podman", "buildah", "runc", "mmdebstrap")
INSTALL_HINT = "install the OS packages podman buildah runc mmdebstrap (`make install` does, with apt)"
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]  # no systemd, no crun on such hosts
RUN_LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1000:1000"]
BASE_BUILD_TIMEOUT_S = 900.0
BUILD_TIMEOUT_S = 1800.0
READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 10


class ContainerError(RuntimeError):
    """A container tool is missing or failed; the message names the command, the image and the tool's own words."""


def tool_path(tool: str) -> str | None:
    """Where a tool is: on PATH, or in /usr/sbin and /sbin (runc's home on Debian, not on a user's PATH)."""
    return shutil.which(tool, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def require_tools(*tools: str) -> None:
    """Fail naming every missing tool (default: all of :data:`TOOLS`)."""
    missing = [t for t in (tools or TOOLS) if tool_path(t) is None]
    if missing:
        raise ContainerError(f"{', '.join(missing)} not found on PATH: {INSTALL_HINT}")


def _run(cmd: Sequence[str], what: str, timeout: float, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool; on failure raise naming ``what``, the command and the end of its output."""
    try:
        proc = subprocess.run(list(cmd), capture_output=True, text=True, timeout=timeout, cwd=cwd, stdin=subprocess.DEVNULL,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise ContainerError(f"{what}: `{' '.join(cmd)}` did not finish within {timeout:.0f}s") from exc
    if proc.returncode != 0:
        output = (proc.stdout[-1500:] + "\n" + proc.stderr[-2500:]).strip()
        raise ContainerError(f"{what}: `{' '.join(cmd)}` exited with {proc.returncode}:\n{output}")
    return proc


# --------------------------------------------------------------------------------------------------- base image


def image_exists(image: str) -> bool:
    """Whether podman's local store holds ``image``."""
    require_tools("podman")
    return subprocess.run([*PODMAN, "image", "exists", image], capture_output=True, check=False).returncode == 0


def base_image_commands(image: str, rootfs: Path) -> list[list[str]]:
    """The two commands that make the default base image: a bookworm root filesystem with python3 (mmdebstrap, from
    the OS's own package mirror) and its import into podman's store as ``image``."""
    return [
        ["mmdebstrap", "--variant=apt", f"--include={','.join(images.BASE_PACKAGES)}", images.BASE_SUITE, str(rootfs)],
        [*PODMAN, "import", "--change", 'CMD ["python3"]', str(rootfs), image],
    ]


def ensure_base_image(image: str | None = None) -> dict[str, Any]:
    """The base image (``KILN_BASE_IMAGE``, default the local bookworm one), built when it is the default and missing.

    Returns ``{"image", "built", "seconds"}``. Concurrent callers wait on a lock file instead of building twice. A
    configured base image that is not in the local store is an error (it is pulled or built by whoever configured it)."""
    import fcntl

    image = image or images.base_image()
    if image_exists(image):
        return {"image": image, "built": False, "seconds": 0.0}
    if image != images.default_base_image():
        raise ContainerError(f"KILN_BASE_IMAGE={image}: no such image in podman's local store; pull or build it first, "
                             f"or unset KILN_BASE_IMAGE for the default ({images.default_base_image()}, built here)")
    require_tools("mmdebstrap", "podman")
    started = time.monotonic()
    with open(Path(tempfile.gettempdir()) / "kiln-base-image.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if image_exists(image):  # built by another process while this one waited
            return {"image": image, "built": False, "seconds": time.monotonic() - started}
        with tempfile.TemporaryDirectory(prefix="kiln-base-") as tmp:
            debootstrap, imported = base_image_commands(image, Path(tmp) / "rootfs.tar")
            _run(debootstrap, f"base image {image}: mmdebstrap", BASE_BUILD_TIMEOUT_S)
            _run(imported, f"base image {image}: podman import", BASE_BUILD_TIMEOUT_S)
    return {"image": image, "built": True, "seconds": time.monotonic() - started}


# ------------------------------------------------------------------------------------------------------- builds


def build_context(bento_path: str | Path, models: Mapping[str, str | Path], into: Path, base: str, model_tag: str) -> Path:
    """Lay out a build context: ``bento/`` (the bento, its models under ``bento/models/<name>/<version>`` as BentoML's
    own containerize does), ``requirements.txt`` (the bento's pins) and the ``Containerfile``; returns ``into``."""
    bento = Path(bento_path)
    if not (bento / "bento.yaml").is_file():
        raise ContainerError(f"{bento}: not a bento folder (no bento.yaml)")
    target = into / "bento"
    shutil.copytree(bento, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for tag, path in models.items():
        name, _, version = tag.partition(":")
        dest = target / "models" / name
        shutil.copytree(Path(path), dest / version)
        (dest / "latest").write_text(version)
    (into / images.REQUIREMENTS).write_text("\n".join(images.bento_requirements(bento)) + "\n")
    (into / images.CONTAINERFILE).write_text(images.containerfile(base, model_tag))
    return into


def build_command(context: Path, image: str, labels: Mapping[str, str] | None = None) -> list[str]:
    """``buildah build`` of a context: chroot isolation and the host network (no daemon, no privileges beyond the
    builder's), layers kept (a new bento with the same pins reuses the installed packages), the host CA bundle mounted
    read-only for the build only."""
    ca = images.CA_BUNDLE
    cmd = ["buildah", "build", "--isolation", "chroot", "--network", "host", "--layers", "-v", f"{ca}:{ca}:ro",
           "-f", str(context / images.CONTAINERFILE), "-t", image]
    for name, value in sorted((labels or {}).items()):
        cmd += ["--label", f"{name}={value}"]
    return [*cmd, str(context)]


def push_command(image: str, destination: str, digestfile: Path) -> list[str]:
    """``buildah push`` of a local image to ``destination`` (``<registry>/<name>:<tag>``), writing the pushed digest."""
    return ["buildah", "push", "--digestfile", str(digestfile), image, f"docker://{destination}"]


def inspect_image(image: str) -> dict[str, Any]:
    """``{"id", "digest", "size", "created"}`` of a local image (the digest is the image manifest's sha256)."""
    proc = _run([*PODMAN, "image", "inspect", image], f"inspect image {image}", 60)
    [info] = json.loads(proc.stdout)
    return {"id": str(info["Id"]), "digest": str(info.get("Digest", "")), "size": int(info.get("Size", 0)),
            "created": str(info.get("Created", ""))}


def build_image(bento_path: str | Path, models: Mapping[str, str | Path], image: str, model_tag: str,
                base: str | None = None, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Build a bento's serving image as ``image`` (the base made first if needed); returns the image's id and digest,
    the base, the build's seconds and whether it was already there (a tag is one bento: it is never rebuilt)."""
    require_tools("buildah", "podman")
    started = time.monotonic()
    if image_exists(image):
        return {"image": image, **inspect_image(image), "base": base or images.base_image(), "reused": True,
                "seconds": time.monotonic() - started, "base_built": False}
    made = ensure_base_image(base)
    with tempfile.TemporaryDirectory(prefix="kiln-image-") as tmp:
        context = build_context(bento_path, models, Path(tmp), made["image"], model_tag)
        _run(build_command(context, image, labels), f"build of {image}", BUILD_TIMEOUT_S)
    return {"image": image, **inspect_image(image), "base": made["image"], "reused": False,
            "seconds": time.monotonic() - started, "base_built": made["built"]}


def push_image(image: str, destination: str) -> str:
    """Push a built image to ``destination``; returns the digest the registry stored it under."""
    require_tools("buildah")
    with tempfile.TemporaryDirectory(prefix="kiln-push-") as tmp:
        digestfile = Path(tmp) / "digest"
        _run(push_command(image, destination, digestfile), f"push of {image} to {destination}", BUILD_TIMEOUT_S)
        return digestfile.read_text().strip()


# ------------------------------------------------------------------------------------------------------ running


def endpoint_env(port: int, host: str = "127.0.0.1", api_key: str | None = None,
                 prediction_log: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a served image on the host network: BentoML's port and host, the API key, the prediction
    log's settings (``KILN_PREDICTION_LOG_*``, as ``ServingResource.prediction_log_env`` gives them)."""
    env = {"BENTOML_PORT": str(port), "BENTOML_HOST": host}
    if api_key:
        env["KILN_API_KEY"] = api_key
    return env | dict(prediction_log or {})


def run_command(image: str, name: str, env: Mapping[str, str], volumes: Sequence[str] = (), user: str | None = None,
                detach: bool = True, read_only: bool = True) -> list[str]:
    """``podman run`` of a serving image on the host network, with the limits such hosts need; ``detach=False`` keeps
    ``podman run`` in the foreground (``--rm``: a signal to it stops and removes the container). ``read_only``: a
    read-only root with a tmpfs on /tmp, as the Kubernetes pod runs it (resources/kubernetes.py)."""
    cmd = [*PODMAN, "run", "-d" if detach else "--rm", "--name", name, "--network", "host", *RUN_LIMITS]
    if read_only:
        cmd += ["--read-only", "--tmpfs", "/tmp"]
    if user:
        cmd += ["--user", user]
    for volume in volumes:
        cmd += ["-v", volume]
    for key, value in sorted(env.items()):
        cmd += ["-e", f"{key}={value}"]
    return [*cmd, image]


def log_volumes(prediction_log: Mapping[str, str]) -> tuple[list[str], str | None]:
    """Bind mounts for a prediction log on local folders (root and spill folder, at the same paths) and the user to run
    as: ``0:0`` when anything is mounted, which is the calling user under rootless podman and root under rootful, so
    the log's files belong to whoever runs the endpoint; none (the image's ``bentoml``) otherwise."""
    folders = [prediction_log.get(k, "") for k in ("KILN_PREDICTION_LOG_ROOT", "KILN_PREDICTION_LOG_SPILL_DIR")]
    local = [f for f in folders if f and "://" not in f]
    for folder in local:
        Path(folder).mkdir(parents=True, exist_ok=True)
    return [f"{f}:{f}" for f in local], ("0:0" if local else None)


def container_state(name: str) -> dict[str, Any] | None:
    """podman's ``State`` of a container (``Running``, ``ExitCode``...), None when there is no such container."""
    proc = subprocess.run([*PODMAN, "container", "inspect", name], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return None
    return dict(json.loads(proc.stdout)[0].get("State", {}))


def container_logs(name: str, lines: int = 40) -> str:
    proc = subprocess.run([*PODMAN, "logs", "--tail", str(lines), name], capture_output=True, text=True, check=False)
    return (proc.stdout + proc.stderr).strip()


def wait_ready(name: str, url: str, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Wait until ``url``/readyz answers 200; raise with the container's log when it exits or the time runs out."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        state = container_state(name)
        if state is None or not state.get("Running", False):
            code = state.get("ExitCode") if state else "gone"
            raise ContainerError(f"container {name} exited ({code}) before {url}/readyz answered:\n{container_logs(name)}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise ContainerError(f"container {name}: {url}/readyz not ready after {timeout_s:.0f}s:\n{container_logs(name)}")


def run_container(image: str, name: str, port: int, host: str = "127.0.0.1", api_key: str | None = None,
                  prediction_log: Mapping[str, str] | None = None, timeout_s: float = READY_TIMEOUT_S) -> dict[str, Any]:
    """Start a serving image as container ``name`` on ``host:port`` and wait for /readyz; returns
    ``{"container", "name", "image", "url", "port"}``. A container that never gets ready is stopped and removed."""
    require_tools("podman", "runc")
    stop_container(name)  # a leftover of the same name (an earlier run that died) would block the name
    volumes, user = log_volumes(prediction_log or {})
    env = endpoint_env(port, host, api_key, prediction_log)
    proc = _run(run_command(image, name, env, volumes, user), f"run of {image} as {name}", 120)
    url = f"http://{host}:{port}"
    try:
        wait_ready(name, url, timeout_s)
    except BaseException:
        stop_container(name)
        raise
    return {"container": proc.stdout.strip(), "name": name, "image": image, "url": url, "port": port}


def stop_container(name: str, timeout_s: int = STOP_TIMEOUT_S) -> bool:
    """Stop (SIGTERM, then SIGKILL after ``timeout_s``) and remove a container; True if there was one."""
    if container_state(name) is None:
        return False
    subprocess.run([*PODMAN, "stop", "-t", str(timeout_s), name], capture_output=True, check=False)
    subprocess.run([*PODMAN, "rm", "-f", name], capture_output=True, check=False)
    return True


def container_name(pipeline: str, port: int) -> str:
    """The container of a pipeline's endpoint backend on ``port``: ``kiln-<p>-<port>`` (one per port, so a roll's new
    backend never takes an old one's name)."""
    return f"kiln-{pipeline.replace('_', '-')}-{port}"


def serve_bento(pipeline: str, bento_tag: str, port: int, host: str = "127.0.0.1", api_key: str | None = None,
                prediction_log: Mapping[str, str] | None = None, timeout_s: float = READY_TIMEOUT_S) -> dict[str, Any]:
    """A local endpoint backend served from the bento's image (``KILN_ENDPOINT_TARGET=container``): what
    ``ServingResource.start_backend`` starts instead of `bentoml serve`. The image must have been built by `<p>/image`.
    Returns :func:`run_container`'s record (``pid`` None: stop it with :func:`stop_container` of ``container``)."""
    image = images.local_image(bento_tag)
    if not image_exists(image):
        raise ContainerError(f"{pipeline}: no image {image} for bento {bento_tag}: materialize {pipeline}/image with "
                             "KILN_ENDPOINT_TARGET=container first")
    started = run_container(image, container_name(pipeline, port), port, host, api_key, prediction_log, timeout_s)
    return started | {"pid": None, "container": started["name"], "container_id": started["container"]}
