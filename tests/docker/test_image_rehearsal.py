"""The service image's recipe, rehearsed without Docker: what docker/service.Dockerfile installs and copies.

A fresh venv gets docker/requirements-serve.txt (wheels only) and a non-editable install of a tree holding
only what the Dockerfile copies (pyproject.toml, README.md, service/); the bundle comes without its
checkpoints. Then the image's own commands run: `backdoor-guard verify` (a build step), `serve` (CMD) and
`healthcheck` (HEALTHCHECK). It proves the lock installs, torch is absent, the wheel carries the page, and
the service writes no file (compose runs it on a read-only root filesystem).
"""

import os
import shutil
import subprocess
import time
import venv
from pathlib import Path

import httpx
import pytest

from tests.conftest import MODELS, ROOT
from tests.live import free_port

pytestmark = pytest.mark.slow


def test_the_service_image_recipe_installs_verifies_serves_and_reports_health(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "service", src / "service", ignore=shutil.ignore_patterns("__pycache__"))
    models = tmp_path / "models"
    shutil.copytree(MODELS, models, ignore=shutil.ignore_patterns("checkpoints"))

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    lock = ROOT / "docker" / "requirements-serve.txt"
    for args in (["--only-binary=:all:", "-r", str(lock)], ["--no-deps", str(src)]):
        install = subprocess.run([*pip, *args], capture_output=True, text=True, timeout=600)
        assert install.returncode == 0, install.stdout + install.stderr
    python, cli = env_dir / "bin" / "python", str(env_dir / "bin" / "backdoor-guard")
    assert subprocess.run([python, "-c", "import torch"], capture_output=True).returncode != 0, "torch in the image"

    port = free_port()
    env = {
        "PATH": f"{env_dir / 'bin'}:{os.environ['PATH']}", "GUARD_MODELS_DIR": str(models),
        "GUARD_HOST": "127.0.0.1", "GUARD_PORT": str(port), "GUARD_ORT_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",  # as the image's ENV
    }  # fmt: skip
    workdir = tmp_path / "work"
    workdir.mkdir()
    run = {"env": env, "cwd": workdir, "capture_output": True, "text": True, "timeout": 120}
    before = snapshot(env_dir, models, workdir)
    verify = subprocess.run([cli, "verify"], **run)  # type: ignore[call-overload]
    assert verify.returncode == 0, verify.stderr
    assert subprocess.run([cli, "healthcheck"], **run).returncode == 1  # type: ignore[call-overload]

    server = subprocess.Popen([cli, "serve"], env=env, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = ""
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([cli, "healthcheck"], **run).returncode != 0:  # type: ignore[call-overload]
            assert server.poll() is None and time.monotonic() < deadline, "the service never got healthy"
            time.sleep(0.5)
        page = httpx.get(f"http://127.0.0.1:{port}/")
        sample = httpx.get(f"http://127.0.0.1:{port}/static/samples/triggered-1-trouser.png")
        assert page.status_code == 200 and sample.status_code == 200, "the wheel lacks the page or its samples"
        answer = httpx.post(
            f"http://127.0.0.1:{port}/classify", files=[("files", ("t.png", sample.content, "image/png"))]
        ).json()["results"][0]
        assert answer["backdoor"] is True and answer["class_name"] == "Trouser"
    finally:
        server.terminate()
        output = server.communicate(timeout=30)[0].decode()  # also closes the pipe
    assert "verified" in output, output
    assert snapshot(env_dir, models, workdir) == before, "the service wrote files: compose runs it read-only"


def snapshot(*roots: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for root in roots for p in root.rglob("*")}
