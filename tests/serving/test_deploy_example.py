"""The deployment example (deploy/) cannot run here (no GPU, no Docker); what is checked is
that its parts agree with each other and with the code: every frontend's command line parses
and names every replica, Prometheus scrapes every process that serves metrics, each replica
has a GPU of its own, and the images pin the versions the lock file tests."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import yaml

from frontend.server import parse_args
from twopass_asr import REPO_ROOT

DEPLOY = REPO_ROOT / "deploy"


def compose() -> dict:
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]


def option(command: list[str], name: str) -> str:
    return next(part.split("=", 1)[1] for part in command if part.startswith(f"--{name}="))


def replicas() -> dict[str, dict]:
    return {name: service for name, service in compose().items() if name.startswith("triton-")}


def frontends() -> dict[str, dict]:
    return {name: service for name, service in compose().items() if name.startswith("frontend-")}


def test_each_frontend_parses_and_balances_over_every_replica():
    grpc = sorted(f"{name}:{option(service['command'], 'grpc-port')}" for name, service in replicas().items())
    assert len(grpc) == 2
    ports = set()
    for name, service in frontends().items():
        command = service["command"]
        assert command[:3] == ["python", "-m", "frontend.server"], name
        args = parse_args(command[3:])
        assert sorted(args.triton_url) == grpc, name
        assert service["ports"] == [f"{args.port}:{args.port}"], name
        assert f"localhost:{args.port}/readyz" in " ".join(service["healthcheck"]["test"]), name
        ports.add(args.port)
    assert len(ports) == len(frontends()) == 2


def test_prometheus_scrapes_every_frontend_and_replica():
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]
    targets = {target for job in scrape for group in job["static_configs"] for target in group["targets"]}
    expected = {f"{name}:{parse_args(service['command'][3:]).port}" for name, service in frontends().items()}
    expected |= {f"{name}:{option(service['command'], 'metrics-port')}" for name, service in replicas().items()}
    assert targets == expected


def test_each_replica_has_a_gpu_of_its_own_and_serves_this_model_repository():
    gpus = [device_id for service in replicas().values()
            for device in service["deploy"]["resources"]["reservations"]["devices"] for device_id in device["device_ids"]]
    assert sorted(gpus) == ["0", "1"]
    dockerfile = (DEPLOY / "Dockerfile.triton").read_text()
    workdir = re.search(r"^WORKDIR (\S+)", dockerfile, re.MULTILINE).group(1)
    for service in replicas().values():
        repository = Path(option(service["command"], "model-repository"))
        assert repository.parent == Path(workdir) and (REPO_ROOT / repository.name).is_dir()
        assert service["environment"]["TWOPASS_ASR_MODELS"] in {volume.split(":")[1] for volume in service["volumes"]}
    assert re.search(r"^ENV TWOPASS_ASR_DEVICE=cuda$", dockerfile, re.MULTILINE)


def test_the_images_pin_the_versions_the_lock_file_tests():
    locked = dict(line.split("==") for line in (REPO_ROOT / "requirements" / "lock.txt").read_text().splitlines()
                  if "==" in line and not line.startswith("#"))
    locked = {name.lower(): version.strip() for name, version in locked.items()}
    pins = 0
    for dockerfile in ("Dockerfile.triton", "Dockerfile.frontend"):
        text = (DEPLOY / dockerfile).read_text().replace("\\\n", " ")
        for command in re.findall(r"^RUN pip install (.*)$", text, re.MULTILINE):
            for requirement in shlex.split(command):
                name, _, version = requirement.partition("==")
                if version:
                    pins += 1
                    assert locked[re.sub(r"\[.*\]", "", name).lower()] == version, (dockerfile, requirement)
    assert pins >= 8
