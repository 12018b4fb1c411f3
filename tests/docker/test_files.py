"""The compose demo's files, checked without a Docker engine: parsers, promtool, and what refers to what."""

import fnmatch
import json
import re
import shutil
import subprocess
from pathlib import Path

import dockerfile
import pytest
import yaml
from compose_spec import PyCompose
from packaging.requirements import Requirement

from tests.conftest import ROOT

DOCKER = ROOT / "docker"
PROMETHEUS = DOCKER / "prometheus"
GRAFANA = DOCKER / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "backdoor-guard.json"
DOCKERFILES = {"service": DOCKER / "service.Dockerfile", "training": DOCKER / "training.Dockerfile"}


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: ${VAR}, ${VAR:-default}; $$ is a literal $."""

    def value(m: re.Match[str]) -> str:
        return env.get(m[1]) or (m[2] or "")

    return re.sub(r"(?<!\$)\$\{(\w+)(?::-([^}]*))?\}", value, text).replace("$$", "$")


def compose(env: dict[str, str] | None = None) -> dict:
    """docker-compose.yml as `docker compose config` would read it, validated by a Compose Spec parser."""
    text = interpolate((ROOT / "docker-compose.yml").read_text(), env or {})
    return PyCompose.from_yaml(text).to_dict()  # raises ValueError on anything the specification rejects


def promtool(*args: str) -> subprocess.CompletedProcess:
    if shutil.which("promtool") is None:
        pytest.fail("promtool is missing: `make test` installs Debian's prometheus")
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=ROOT)


def test_compose_parses_and_has_the_four_services() -> None:
    services = compose()["services"]
    assert set(services) == {"guard", "prometheus", "grafana", "demo-client"}
    assert "8000:8000" in str(services["guard"]["ports"])
    assert "9000:8000" in str(compose({"GUARD_PORT": "9000"})["services"]["guard"]["ports"])
    for name in ("prometheus", "grafana"):
        image = services[name]["image"]
        assert re.fullmatch(r"[\w./-]+:v?\d+\.\d+\.\d+", image), f"{name}: pin an exact version, not {image}"
    for name in ("prometheus", "demo-client"):
        assert services[name]["depends_on"]["guard"]["condition"] == "service_healthy"


def test_every_file_compose_builds_from_or_mounts_exists() -> None:
    for name, service in compose()["services"].items():
        if "build" in service:
            context = ROOT / service["build"]["context"]
            assert context.is_dir() and (context / service["build"]["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"


def test_the_pieces_point_at_each_other() -> None:
    """Prometheus scrapes the guard's service name and port; Grafana reads that Prometheus; panels use its uid."""
    services = compose()["services"]
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["global"]["scrape_interval"] == "5s"
    (job,) = config["scrape_configs"]
    assert job["static_configs"][0]["targets"] == ["guard:8000"] and "guard" in services
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = datasource["datasources"]
    assert source["url"] == "http://prometheus:9090" and "prometheus" in services
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "backdoor-guard.yml").read_text())
    grafana_mounts = {v["target"] if isinstance(v, dict) else v.split(":")[1] for v in services["grafana"]["volumes"]}
    assert provider["providers"][0]["options"]["path"] in grafana_mounts
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]


def test_the_dashboard_has_the_panels_the_operators_asked_for() -> None:
    text = DASHBOARD.read_text()
    for metric in (
        "guard_requests_total", "guard_request_duration_seconds_bucket", "guard_queue_wait_seconds_bucket",
        "guard_batch_compute_seconds_bucket", "guard_batch_size_images", "guard_images_total",
        "guard_signal_triggers_total", "guard_strip_entropy_bucket", "guard_fused_surprise_bucket",
    ):  # fmt: skip
        assert metric in text, metric
    titles = [p["title"] for p in json.loads(text)["panels"]]
    assert any("p99" in t for t in titles) and any(p == "heatmap" for p in re.findall(r'"type": "(\w+)"', text))
    assert len(titles) == len(set(titles))


def test_promtool_accepts_the_config_and_the_rules() -> None:
    for args in (
        ("check", "config", "docker/prometheus/prometheus.yml"),
        ("check", "rules", *map(str, sorted((PROMETHEUS / "rules").glob("*.yml")))),
    ):
        result = promtool(*args)
        assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 1 rule files found" in promtool("check", "config", "docker/prometheus/prometheus.yml").stdout


def test_the_alerts_fire_when_they_should_and_not_otherwise() -> None:
    """promtool's own unit tests of the alert rules: an attack wave pages, the clean FPR does not, etc."""
    result = promtool("test", "rules", "docker/prometheus/tests/guard.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def stages(path: Path) -> list[list[dockerfile.Command]]:
    """The Dockerfile through buildkit's own parser, split into build stages."""
    out: list[list[dockerfile.Command]] = []
    for command in dockerfile.parse_file(str(path)):
        if command.cmd == "FROM":
            out.append([])
        if out:
            out[-1].append(command)
    return out


def base_images(path: Path) -> list[str]:
    args = dict(c.value[0].split("=", 1) for c in dockerfile.parse_file(str(path)) if c.cmd == "ARG")
    return [re.sub(r"\$\{(\w+)\}", lambda m: args[m[1]], stage[0].value[0]) for stage in stages(path)]


def dockerignored(path: str) -> bool:
    patterns = [p for p in (ROOT / ".dockerignore").read_text().splitlines() if p and not p.startswith("#")]
    parts = Path(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    return any(fnmatch.fnmatch(prefix, p.removeprefix("**/")) for p in patterns for prefix in prefixes)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_dockerfiles_pin_their_base_and_run_as_a_user(name: str) -> None:
    path = DOCKERFILES[name]
    for image in base_images(path):
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", image), f"pin an exact slim base, not {image}"
    final = stages(path)[-1]
    users = [c.value[0] for c in final if c.cmd == "USER"]
    assert users and users[-1] not in ("root", "0"), "the final stage must not run as root"
    for command in (c for stage in stages(path) for c in stage if c.cmd in ("COPY", "ADD")):
        if any(f.startswith("--from") for f in command.flags):
            continue
        for source in command.value[:-1]:
            assert (ROOT / source).exists(), f"{name}: COPY {source} does not exist"
            assert not dockerignored(source), f"{name}: COPY {source} is excluded by .dockerignore"


def test_the_service_image_is_slim_verified_and_healthchecked() -> None:
    final = stages(DOCKERFILES["service"])[-1]
    commands = {c.cmd: c for c in final}
    run = " ".join(" ".join(c.value) for c in final if c.cmd == "RUN")
    assert "apt-get" not in run and "pip install" not in run, "no package installs in the runtime stage"
    assert "backdoor-guard verify" in run, "the image does not build unless its bundle verifies"
    assert commands["HEALTHCHECK"].value == ("CMD", "backdoor-guard", "healthcheck")
    assert commands["EXPOSE"].value == ("8000",)
    env = dict(zip(commands["ENV"].value[::2], commands["ENV"].value[1::2], strict=True))
    assert {"GUARD_ORT_THREADS", "GUARD_MODELS_DIR", "GUARD_PORT"} <= set(env)
    assert not re.search(r"\btorch\b", DOCKERFILES["service"].read_text().split("FROM")[1]), "no torch"


def test_dockerignore_keeps_venvs_data_and_caches_out() -> None:
    for path in (".venv/bin/python", "data/mnist/x.json", "build/eval/x", ".git/HEAD", "service/__pycache__/a.pyc"):
        assert dockerignored(path), path
    for path in ("service/app.py", "models/manifest.json", "docker/requirements-serve.txt", "pyproject.toml"):
        assert not dockerignored(path), path


def test_the_service_lock_pins_the_serve_extra_and_no_torch() -> None:
    import tomllib

    lock = {}
    for line in (DOCKER / "requirements-serve.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            lock[name.lower().replace("_", "-")] = version
    assert "torch" not in lock and "onnxruntime-gpu" not in lock
    extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    for spec in map(Requirement, extra):
        name = spec.name.lower()
        assert name in lock, f"{name} (serve extra) is not in docker/requirements-serve.txt: make docker-lock"
        assert spec.specifier.contains(lock[name]), f"{name}=={lock[name]} does not satisfy {spec}: make docker-lock"


def test_onnx_runtime_threads_come_from_the_environment() -> None:
    assert str(compose()["services"]["guard"]["environment"]["GUARD_ORT_THREADS"]) == "0"
    assert str(compose({"GUARD_ORT_THREADS": "2"})["services"]["guard"]["environment"]["GUARD_ORT_THREADS"]) == "2"


def test_the_training_image_installs_what_training_imports() -> None:
    """training/ imports service/ (one guard for calibration and serving), whose errors and decoding use FastAPI's
    and pydantic's types: the train extra alone left `python -m training` failing on import."""
    import tomllib

    commands = dockerfile.parse_file(str(ROOT / "docker" / "training.Dockerfile"))
    installs = [c.value[0] for c in commands if c.cmd == "RUN"]
    (src,) = [r for r in installs if "/src[" in r]
    extras = set(re.search(r"/src\[([^\]]+)\]", src).group(1).split(","))  # type: ignore[union-attr]
    assert {"train", "serve"} <= extras, src
    serve = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["serve"]
    assert any(d.startswith("fastapi") for d in serve) and "from fastapi" in (ROOT / "service/errors.py").read_text()
