"""`<p>/image` without building: the "no image" record of the local target, the mode per profile and target, the
rendered Containerfile and build context, the exact buildah/podman/mmdebstrap command lines (a push needs a registry,
so the push path runs against stand-ins of the build and push functions), and the image reference in the endpoint's
manifests. tests/integration/test_serving_image.py builds and runs a real image."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from kiln.spec import load_spec
from tests.conftest import FRAUD_SPEC

BENTO = {"tag": "kiln-fraud:v7abc", "model_tag": "fraud:m1xyz", "model_version": "7"}
CA = "/etc/ssl/certs/ca-certificates.crt"
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]


@pytest.fixture()
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("KILN_PROFILE", "KILN_ENDPOINT_TARGET", "KILN_BASE_IMAGE", "KILN_IMAGE_REGISTRY"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _context(tmp_path: Path) -> Any:
    import dagster as dg

    from resources.serving import ServingResource

    # the session's BentoML store (tests/conftest.py): bentoml binds its store once per process, on first import
    return dg.build_asset_context(resources={
        "serving": ServingResource(state_root=str(tmp_path / "state"), bentoml_home=os.environ["BENTOML_HOME"])})


def test_image_mode_per_profile_and_target() -> None:
    from assets.image import image_mode

    assert image_mode("local", "kubernetes") == "none"  # KILN_ENDPOINT_TARGET unset: the local profile serves the bento
    assert image_mode("local", "local") == "none"
    assert image_mode("prod", "local") == "none"
    assert image_mode("local", "container") == image_mode("prod", "container") == "build"
    assert image_mode("prod", "kubernetes") == image_mode("prod", "gitops") == "push"


def test_the_local_default_records_that_no_image_was_built(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from assets import image as image_step

    asset = image_step.build(load_spec(FRAUD_SPEC))
    out = asset(_context(tmp_path), bento=BENTO)
    record = out.value
    assert record["image"] == "none" and record["built"] is False and record["ref"] is None
    assert record["id"] is None and record["digest"] is None
    assert record["bento"] == BENTO["tag"] and record["model_version"] == "7"
    assert "KILN_ENDPOINT_TARGET=kubernetes in the local profile" in record["reason"]
    assert "KILN_ENDPOINT_TARGET=container" in record["reason"]  # says how to get an image
    assert out.metadata["image"].value == "none" and out.metadata["built"].value is False
    assert not (tmp_path / "bentoml").exists()  # nothing was looked up in BentoML's store


def test_the_prod_step_builds_then_pushes_to_the_registry(clean_env: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from assets import image as image_step
    from resources import containers

    clean_env.setenv("KILN_PROFILE", "prod")
    clean_env.setenv("KILN_ENDPOINT_TARGET", "gitops")
    clean_env.setenv("KILN_IMAGE_REGISTRY", "registry.example.com/ml/")
    calls: list[tuple[Any, ...]] = []
    digest = "sha256:" + "b" * 64

    def fake_files(bentoml: Any, bento: dict[str, Any]) -> tuple[Path, dict[str, Path]]:
        return tmp_path / "bento", {"fraud:m1xyz": tmp_path / "model"}

    def fake_build(bento_path: Any, models: Any, image: str, model_tag: str, base: str | None = None,
                   labels: Any = None) -> dict[str, Any]:
        calls.append(("build", bento_path, dict(models), image, model_tag, dict(labels)))
        return {"image": image, "id": "c" * 64, "digest": "sha256:" + "a" * 64, "size": 1, "created": "", "base": "b",
                "reused": False, "seconds": 3.21, "base_built": False}

    def fake_push(image: str, destination: str) -> str:
        calls.append(("push", image, destination))
        return digest

    clean_env.setattr(image_step, "bento_files", fake_files)
    clean_env.setattr(containers, "build_image", fake_build)
    clean_env.setattr(containers, "push_image", fake_push)
    record = image_step.build(load_spec(FRAUD_SPEC))(_context(tmp_path), bento=BENTO).value
    assert calls == [
        ("build", tmp_path / "bento", {"fraud:m1xyz": tmp_path / "model"}, "localhost/kiln-fraud:v7abc", "fraud:m1xyz",
         {"kiln.pipeline": "fraud", "kiln.bento": "kiln-fraud:v7abc", "kiln.model_version": "7"}),
        ("push", "localhost/kiln-fraud:v7abc", "registry.example.com/ml/kiln-fraud:v7abc"),
    ]
    assert record["ref"] == f"registry.example.com/ml/kiln-fraud:v7abc@{digest}"
    assert record["digest"] == digest and record["pushed"] is True and record["built"] is True
    assert record["id"] == "c" * 64 and record["image"] == "localhost/kiln-fraud:v7abc"


def test_the_rendered_containerfile() -> None:
    from serving.images import containerfile

    text = containerfile("localhost/kiln-base:bookworm-0123", "fraud:m1xyz")
    lines = text.splitlines()
    assert lines[1] == "FROM localhost/kiln-base:bookworm-0123"
    assert "RUN python3 -m venv /app/.venv" in lines
    assert "COPY requirements.txt /app/requirements.txt" in lines
    install = text[text.index("RUN --mount=type=cache,target=/root/.cache/pip"):]
    assert install.split("\n", 2)[1].strip() == (
        f"PIP_CERT={CA} pip install --disable-pip-version-check --no-input -r /app/requirements.txt")
    # The CA bundle is only named for pip at build time (buildah mounts it); nothing copies it into the image.
    assert text.count(CA) == 1 and not any(line.startswith(("COPY", "ADD")) and CA in line for line in lines)
    assert "KILN_MODEL_TAG=fraud:m1xyz" in text and "BENTOML_PORT=3000" in text and "BENTOML_HOME=/home/bentoml/" in text
    assert "COPY --chown=1034:1034 bento/ /home/bentoml/bento/" in lines
    # BentoML's store folders exist before it starts: the image runs with a read-only root (the pod's securityContext)
    store = "/home/bentoml/bentos /home/bentoml/envs /home/bentoml/models /home/bentoml/tmp"
    assert f" && mkdir -p {store} && chown 1034:1034 {store}" in lines
    assert lines[-3:] == ["WORKDIR /home/bentoml/bento", "EXPOSE 3000", 'ENTRYPOINT ["bentoml", "serve", "/home/bentoml/bento"]']
    assert lines.index("USER 1034:1034") > lines.index("COPY --chown=1034:1034 bento/ /home/bentoml/bento/")


def test_the_build_context_carries_the_bento_its_models_and_its_pins(tmp_path: Path) -> None:
    from importlib.metadata import version

    from resources.containers import ContainerError, build_context

    bento = tmp_path / "bento"
    (bento / "env" / "python").mkdir(parents=True)
    (bento / "src" / "serving").mkdir(parents=True)
    (bento / "bento.yaml").write_text("service: serving.service:KilnService\n")
    (bento / "src" / "serving" / "service.py").write_text("# the service\n")
    (bento / "env" / "python" / "requirements.txt").write_text("polars==2.1.0\n# a comment\n\nlightgbm==4.7.0\n")
    model = tmp_path / "store" / "fraud" / "m1xyz"
    model.mkdir(parents=True)
    (model / "model.yaml").write_text("name: fraud\n")
    context = build_context(bento, {"fraud:m1xyz": model}, tmp_path / "ctx", "localhost/base:1", "fraud:m1xyz")
    assert (context / "bento" / "src" / "serving" / "service.py").read_text() == "# the service\n"
    assert (context / "bento" / "models" / "fraud" / "m1xyz" / "model.yaml").read_text() == "name: fraud\n"
    assert (context / "bento" / "models" / "fraud" / "latest").read_text() == "m1xyz"
    # the bento's pins, plus BentoML at the locked version (the bento lists it only when BentoML wrote it)
    assert (context / "requirements.txt").read_text().splitlines() == ["polars==2.1.0", "lightgbm==4.7.0",
                                                                      f"bentoml=={version('bentoml')}"]
    assert (context / "Containerfile").read_text().splitlines()[1] == "FROM localhost/base:1"
    with pytest.raises(ContainerError, match=r"not a bento folder \(no bento.yaml\)"):
        build_context(tmp_path / "store", {}, tmp_path / "ctx2", "b", "m")


def test_the_build_push_run_and_base_command_lines(tmp_path: Path) -> None:
    from resources import containers

    ctx = tmp_path / "ctx"
    assert containers.build_command(ctx, "localhost/kiln-fraud:v7abc", {"kiln.pipeline": "fraud"}) == [
        "buildah", "build", "--isolation", "chroot", "--network", "host", "--layers", "-v", f"{CA}:{CA}:ro",
        "-f", str(ctx / "Containerfile"), "-t", "localhost/kiln-fraud:v7abc", "--label", "kiln.pipeline=fraud", str(ctx)]
    assert containers.push_command("localhost/kiln-fraud:v7abc", "registry.local/kiln/kiln-fraud:v7abc", tmp_path / "d") == [
        "buildah", "push", "--digestfile", str(tmp_path / "d"), "localhost/kiln-fraud:v7abc",
        "docker://registry.local/kiln/kiln-fraud:v7abc"]
    env = containers.endpoint_env(3123, api_key="k", prediction_log={"KILN_PREDICTION_LOG_ROOT": "/s"})
    assert env == {"BENTOML_PORT": "3123", "BENTOML_HOST": "127.0.0.1", "KILN_API_KEY": "k", "KILN_PREDICTION_LOG_ROOT": "/s"}
    assert containers.run_command("localhost/kiln-fraud:v7abc", "kiln-fraud", env, ["/s:/s"], "0:0") == [
        *PODMAN, "run", "-d", "--name", "kiln-fraud", "--network", "host", "--ulimit", "nofile=1024:1024",
        "--ulimit", "nproc=1000:1000", "--read-only", "--tmpfs", "/tmp", "--user", "0:0", "-v", "/s:/s", "-e", "BENTOML_HOST=127.0.0.1",
        "-e", "BENTOML_PORT=3123", "-e", "KILN_API_KEY=k", "-e", "KILN_PREDICTION_LOG_ROOT=/s", "localhost/kiln-fraud:v7abc"]
    assert containers.run_command("i", "n", {}, detach=False)[5:7] == ["run", "--rm"]
    assert "--read-only" not in containers.run_command("i", "n", {}, read_only=False)
    assert containers.container_name("fraud_slo", 3100) == "kiln-fraud-slo-3100"
    assert containers.base_image_commands("localhost/kiln-base:x", tmp_path / "rootfs.tar") == [
        ["mmdebstrap", "--variant=apt", "--include=python3,python3-venv,python3-pip,ca-certificates,libgomp1", "bookworm",
         str(tmp_path / "rootfs.tar")],
        [*PODMAN, "import", "--change", 'CMD ["python3"]', str(tmp_path / "rootfs.tar"), "localhost/kiln-base:x"]]


def test_log_volumes_mount_local_folders_only(tmp_path: Path) -> None:
    from resources.containers import log_volumes

    root, spill = tmp_path / "state", tmp_path / "spill"
    volumes, user = log_volumes({"KILN_PREDICTION_LOG_ROOT": str(root), "KILN_PREDICTION_LOG_SPILL_DIR": str(spill)})
    assert volumes == [f"{root}:{root}", f"{spill}:{spill}"] and user == "0:0" and root.is_dir() and spill.is_dir()
    assert log_volumes({"KILN_PREDICTION_LOG_ROOT": "s3://bucket/state"}) == ([], None)


def test_the_base_image_is_configurable(clean_env: pytest.MonkeyPatch) -> None:
    import re

    from serving import images

    default = images.default_base_image()
    assert re.fullmatch(r"localhost/kiln-base:bookworm-[0-9a-f]{12}", default)
    assert images.base_image() == default
    clean_env.setenv("KILN_BASE_IMAGE", "registry.example.com/python:3.11-bookworm")
    assert images.base_image() == "registry.example.com/python:3.11-bookworm"
    clean_env.setattr(images, "BASE_PACKAGES", (*images.BASE_PACKAGES, "curl"))
    assert images.default_base_image() != default  # another package list names another image: never a stale base


def test_the_endpoint_references_the_built_image() -> None:
    from assets.endpoint import with_image
    from resources.kubernetes import release_images

    spec = load_spec(FRAUD_SPEC)
    ref = "registry.local/kiln/kiln-fraud:v7abc@sha256:" + "d" * 64
    image = {"image": "localhost/kiln-fraud:v7abc", "ref": ref, "bento": "kiln-fraud:v7abc", "id": "e" * 64, "digest": "sha256:d"}
    bento = with_image(BENTO, image)
    assert bento["image_ref"] == ref and bento["tag"] == BENTO["tag"]
    assert with_image(BENTO, None) == with_image(BENTO, {"image": "none", "ref": None, "bento": BENTO["tag"]}) == BENTO
    assert with_image(BENTO, image | {"bento": "kiln-fraud:older"}) == BENTO  # an image of another bento is never used
    assert release_images(spec, {"7": bento}) == {"7": ref}
    assert release_images(spec, {"7": BENTO})["7"].endswith("/kiln-fraud:v7abc")  # no image: the name by convention


def test_the_written_manifests_name_the_pushed_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import yaml

    from assets.endpoint import with_image
    from resources.kubernetes import endpoint_record

    monkeypatch.setenv("KILN_K8S_NAMESPACE", "kiln")
    ref = "registry.local/kiln/kiln-fraud:v7abc@sha256:" + "d" * 64
    bento = with_image(BENTO, {"ref": ref, "bento": BENTO["tag"]})
    record = endpoint_record(load_spec(FRAUD_SPEC), bento, str(tmp_path))
    [deployment, _] = list(yaml.safe_load_all(Path(record["manifests"]).read_text()))
    assert record["image"] == ref == deployment["spec"]["template"]["spec"]["containers"][0]["image"]
