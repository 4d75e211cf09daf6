"""The services stack: docker-compose.yml, the Dockerfile, .env.example and deploy/.

Docker does not run here, so the file is checked for shape (images, commands, health
checks, dependencies, ports, variables) and for agreement with the code (queues, URLs,
paths), and every command it runs is run: the one-shot migrate/bootstrap line,
`check --deploy` with the compose environment, gunicorn with deploy/gunicorn.conf.py
(and nginx with deploy/nginx/default.conf in front of it, when nginx is installed),
the health-check commands, the MinIO bucket script, and, with Redis, the Celery
worker, demo worker and beat lines with their `inspect ping` health checks.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import secrets
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from django.conf import settings
from django.urls import reverse

from tests.conftest import skip_unless_required
from tests.servers import free_port, nginx_running, process_env, started, wait_for

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict] = COMPOSE["services"]
NGINX_CONF = (ROOT / "deploy" / "nginx" / "default.conf").read_text()
DOCKERFILE = (ROOT / "Dockerfile").read_text()

ONE_SHOT = {"minio-bucket", "migrate"}
APP_SERVICES = {"migrate", "web", "worker", "beat", "demo-worker-gpu", "demo-worker-cpu"}
# Read by docker compose itself, not interpolated in the file.
COMPOSE_OWN_VARIABLES = {"COMPOSE_PROFILES"}
TOKEN = "Tk9qR3xZ7wPq2LmN8vB4cD6fG1hJ5kS0"  # 32 characters, like a real link token


# --- reading the files ----------------------------------------------------------------


def parse_dotenv(path: Path) -> dict[str, str]:
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        assert sep, f"{path.name}: not NAME=value: {line!r}"
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
            value = value[1:-1]
        values[name.strip()] = value
    return values


ENV_EXAMPLE = parse_dotenv(ROOT / ".env.example")
REQUIRED_SECRETS = {
    "SECRET_KEY": secrets.token_urlsafe(64),
    "POSTGRES_PASSWORD": secrets.token_urlsafe(16),
    "MINIO_ROOT_PASSWORD": secrets.token_urlsafe(16),
    "WEIGHTS_S3_SECRET_ACCESS_KEY": secrets.token_urlsafe(16),
}
DOTENV = {**ENV_EXAMPLE, **REQUIRED_SECRETS}

_REFERENCE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_]\w*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_]\w*)(?:(?P<op>:?[-?])(?P<arg>.*))?", re.S)


class MissingVariable(Exception):
    pass


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's interpolation: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e}, ${VAR?e}."""

    def substitute(match: re.Match) -> str:
        if match["escaped"]:
            return "$"
        if match["plain"]:
            return env.get(match["plain"], "")
        braced = _BRACED.fullmatch(match["braced"])
        assert braced, f"unsupported interpolation ${{{match['braced']}}}"
        name, op, arg = braced["name"], braced["op"], braced["arg"]
        value = env.get(name)
        if op is None:
            return value or ""
        if op == ":-":
            return value or arg
        if op == "-":
            return arg if value is None else value
        if (op == ":?" and not value) or (op == "?" and value is None):
            raise MissingVariable(f"{name}: {arg}")
        return value or ""

    return _REFERENCE.sub(substitute, text)


def strings(node) -> Iterator[str]:
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for value in node.values():
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


def resolve(node, env: dict[str, str] = DOTENV):
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, dict):
        return {key: resolve(value, env) for key, value in node.items()}
    if isinstance(node, list):
        return [resolve(item, env) for item in node]
    return node


def variables_used() -> set[str]:
    names = set()
    for text in strings(COMPOSE):
        for match in _REFERENCE.finditer(text):
            if match["plain"]:
                names.add(match["plain"])
            elif match["braced"]:
                names.add(_BRACED.fullmatch(match["braced"])["name"])
    return names


def service(name: str) -> dict:
    return resolve(SERVICES[name])


def service_env(name: str) -> dict[str, str]:
    return {key: str(value) for key, value in service(name)["environment"].items()}


def argv(command) -> list[str]:
    return list(command) if isinstance(command, list) else shlex.split(command)


def healthcheck_argv(name: str) -> list[str]:
    test = service(name)["healthcheck"]["test"]
    kind, rest = test[0], test[1:]
    assert kind in ("CMD", "CMD-SHELL"), f"{name}: healthcheck test starts with {kind}"
    return list(rest) if kind == "CMD" else ["sh", "-c", rest[0]]


def dockerfile_stages() -> set[str]:
    return set(re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", DOCKERFILE, re.M | re.I))


def depends(name: str) -> dict[str, dict]:
    value = SERVICES[name].get("depends_on") or {}
    return (
        {dep: {"condition": "service_started"} for dep in value}
        if isinstance(value, list)
        else value
    )


def nginx_locations() -> dict[str, str]:
    """location match -> its body (the conf has no nested blocks inside a location)."""
    return {
        match[1].strip(): match[2]
        for match in re.finditer(r"^\s*location\s+([^{]+)\{(.*?)^\s*\}", NGINX_CONF, re.M | re.S)
    }


def volume_target(service_name: str, volume: str) -> str:
    for entry in SERVICES[service_name].get("volumes", []):
        source, target, *_ = entry.split(":")
        if source == volume:
            return target
    raise AssertionError(f"{service_name} does not mount {volume}")


# --- shape -------------------------------------------------------------------------------


def test_the_stack_has_every_part():
    assert set(SERVICES) == {
        "postgres",
        "redis",
        "minio",
        "minio-bucket",
        "migrate",
        "web",
        "nginx",
        "worker",
        "beat",
        "demo-worker-gpu",
        "demo-worker-cpu",
    }


def test_every_service_has_an_image_or_a_build_of_a_dockerfile_stage():
    stages = dockerfile_stages()
    assert {"app", "nginx"} <= stages
    for name, spec in SERVICES.items():
        assert spec.get("image") or spec.get("build"), f"{name} has neither image nor build"
        if "build" in spec:
            assert spec["build"]["context"] == "."
            assert spec["build"]["target"] in stages, f"{name} builds a missing stage"
        if name in APP_SERVICES:
            assert spec["build"]["target"] == "app", name


def test_services_on_the_app_image_say_what_they_run():
    for name in APP_SERVICES:
        assert SERVICES[name].get("command"), f"{name} runs the image default; name the command"
    assert argv(SERVICES["web"]["command"])[:3] == ["gunicorn", "-c", "deploy/gunicorn.conf.py"]
    assert SERVICES["minio"]["command"].startswith("server /data")
    assert SERVICES["minio-bucket"]["entrypoint"] == ["/bin/sh", "/deploy/minio-bucket.sh"]


def test_long_running_services_restart_and_have_health_checks():
    for name, spec in SERVICES.items():
        if name in ONE_SHOT:
            assert spec.get("restart") == "no", f"one-shot {name} must not restart"
            assert "healthcheck" not in spec, name
            continue
        assert spec.get("restart") == "unless-stopped", name
        check = spec.get("healthcheck")
        assert check and check.get("test"), f"{name} has no health check"
        assert not check.get("disable"), name
        for field in ("interval", "timeout", "retries"):
            assert check.get(field), f"{name} healthcheck lacks {field}"


def test_dependencies_exist_use_the_right_condition_and_have_no_cycle():
    allowed = {"service_healthy", "service_completed_successfully", "service_started"}
    for name in SERVICES:
        for dep, spec in depends(name).items():
            assert dep in SERVICES, f"{name} depends on unknown service {dep}"
            condition = spec.get("condition")
            assert condition in allowed, f"{name} -> {dep}: {condition}"
            if dep in ONE_SHOT:
                assert condition == "service_completed_successfully", f"{name} -> {dep}"
            else:
                assert condition == "service_healthy", f"{name} -> {dep}"
    # Everything that runs the app waits for migrations; migrations wait for the data stores.
    for name in APP_SERVICES - {"migrate"}:
        assert "migrate" in depends(name) and "redis" in depends(name), name
    assert set(depends("migrate")) == {"postgres", "minio-bucket"}
    assert set(depends("minio-bucket")) == {"minio"}
    assert set(depends("nginx")) == {"web"}
    # Topological order exists (compose would refuse a cycle).
    done: set[str] = set()
    pending = set(SERVICES)
    while pending:
        ready = {name for name in pending if set(depends(name)) <= done}
        assert ready, f"dependency cycle among {sorted(pending)}"
        done |= ready
        pending -= ready


def test_only_nginx_and_minio_publish_ports():
    published = {name: spec["ports"] for name, spec in SERVICES.items() if spec.get("ports")}
    assert set(published) == {"nginx", "minio"}
    assert resolve(published["nginx"]) == ["80:80"]
    assert resolve(published["minio"]) == [f"{ENV_EXAMPLE['MINIO_PORT']}:9000"]
    assert "ports" not in SERVICES["web"] and SERVICES["web"]["expose"] == ["8000"]


def test_every_variable_is_documented_in_env_example_and_none_is_stray():
    used = variables_used()
    missing = used - set(ENV_EXAMPLE)
    assert not missing, f"add to .env.example: {sorted(missing)}"
    stray = set(ENV_EXAMPLE) - used - COMPOSE_OWN_VARIABLES
    assert not stray, f".env.example lists variables docker-compose.yml never reads: {stray}"
    text = (ROOT / ".env.example").read_text()
    for name in ENV_EXAMPLE:
        # Each variable has a comment in its section, at least a heading above it.
        assert re.search(rf"^#.*\n(?:[A-Z0-9_]+=.*\n)*{name}=", text, re.M), name


def test_secrets_have_no_working_placeholder_and_are_required():
    for name in REQUIRED_SECRETS:
        assert ENV_EXAMPLE[name] == "", f"{name} must be blank in .env.example"
    with pytest.raises(MissingVariable, match="SECRET_KEY"):
        resolve(COMPOSE, ENV_EXAMPLE)
    resolve(COMPOSE, DOTENV)  # with the secrets set, every reference resolves


def test_the_app_never_gets_minio_root_credentials():
    for name in APP_SERVICES:
        environment = SERVICES[name]["environment"]
        assert not any("MINIO_ROOT" in value for value in strings(environment)), name
    env = service_env("web")
    assert env["WEIGHTS_S3_ACCESS_KEY_ID"] == ENV_EXAMPLE["WEIGHTS_S3_ACCESS_KEY_ID"]
    bucket = service_env("minio-bucket")
    for key in ("WEIGHTS_S3_BUCKET", "WEIGHTS_S3_ACCESS_KEY_ID", "WEIGHTS_S3_SECRET_ACCESS_KEY"):
        assert bucket[key] == env[key]


def test_presigned_urls_point_where_browsers_and_the_stack_both_reach_minio():
    """The web signs for WEIGHTS_S3_ENDPOINT_URL; the browser must reach the same name."""
    endpoint = urlsplit(service_env("web")["WEIGHTS_S3_ENDPOINT_URL"])
    public_host = ENV_EXAMPLE["WEIGHTS_S3_PUBLIC_HOST"]
    assert endpoint.hostname == public_host
    assert endpoint.port == int(ENV_EXAMPLE["MINIO_PORT"]) == 9000  # published 1:1
    assert resolve(SERVICES["minio"]["networks"]["default"]["aliases"]) == [public_host]
    # Browsers resolve *.localhost to loopback, where MinIO is published.
    assert public_host.endswith(".localhost")


def test_demo_worker_reserves_a_gpu_in_the_gpu_profile_and_runs_on_cpu_otherwise():
    gpu, cpu = SERVICES["demo-worker-gpu"], SERVICES["demo-worker-cpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    [device] = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "deploy" not in cpu
    assert service_env("demo-worker-gpu")["DEMO_DEVICE"] == "cuda"
    assert service_env("demo-worker-cpu")["DEMO_DEVICE"] == "cpu"
    assert argv(gpu["command"]) == argv(cpu["command"])
    assert gpu["image"] != cpu["image"], "the GPU image carries CUDA torch, the default does not"
    assert "TORCH_INDEX_URL" in gpu["build"]["args"]
    assert "ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu" in DOCKERFILE
    assert set(ENV_EXAMPLE["COMPOSE_PROFILES"].split(",")) <= {"cpu", "gpu"}


def _option(args: list[str], *names: str) -> str:
    for index, arg in enumerate(args):
        if arg in names:
            return args[index + 1]
    raise AssertionError(f"{names} not in {args}")


def test_workers_consume_every_routed_queue_and_ping_their_own_node_name():
    workers = {name: argv(service(name)["command"]) for name in APP_SERVICES if "worker" in name}
    consumed = set()
    for name, args in workers.items():
        assert args[:4] == ["celery", "-A", "portal", "worker"], name
        consumed |= set(_option(args, "-Q", "--queues").split(","))
        node = _option(args, "-n", "--hostname")
        assert node.endswith("@%h"), f"{name}: name the node <name>@%h"
        ping = " ".join(healthcheck_argv(name))
        assert f"inspect ping -d {node.replace('%h', '$HOSTNAME')}" in ping, name
    routed = {route["queue"] for route in settings.CELERY_TASK_ROUTES.values()}
    assert consumed == routed | {settings.CELERY_TASK_DEFAULT_QUEUE}
    assert _option(argv(service("demo-worker-cpu")["command"]), "--pool", "-P") == "threads"


def test_web_and_nginx_agree_on_paths_ports_and_limits():
    web = service_env("web")
    locations = nginx_locations()
    # gunicorn listens where nginx sends the traffic.
    port = web["GUNICORN_BIND"].rsplit(":", 1)[1]
    assert re.search(rf"^\s*server web:{port};", NGINX_CONF, re.M)
    # Static files: collected at build into STATIC_ROOT (/app/var/static) and copied to nginx.
    assert Path(settings.STATIC_ROOT).relative_to(settings.VAR_DIR) == Path("static")
    assert "collectstatic --noinput" in DOCKERFILE
    assert "COPY --from=base /app/var/static /srv/static" in DOCKERFILE
    assert "/" + settings.STATIC_URL.strip("/") + "/" in locations
    assert "alias /srv/static/;" in locations["/static/"]
    # Local-storage downloads: Django's X-Accel prefix is nginx's internal location, which
    # aliases the volume the app writes its local weights to.
    prefix = web["WEIGHTS_X_ACCEL_PREFIX"]
    accel = locations[prefix]
    assert "internal;" in accel and "alias /srv/weights/;" in accel
    assert volume_target("nginx", "local-weights") == "/srv/weights"
    for name in APP_SERVICES:
        assert volume_target(name, "local-weights") == web["WEIGHTS_LOCAL_ROOT"], name
    assert "local-weights:/srv/weights:ro" in SERVICES["nginx"]["volumes"]
    # Bodies: nginx lets through what Django accepts, and not much more.
    limit = re.search(r"client_max_body_size (\d+)k;", NGINX_CONF)
    assert (
        settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        <= int(limit[1]) * 1024
        <= 2 * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE)
    )
    # The conf goes where the nginx image includes it.
    assert "COPY deploy/nginx/default.conf /etc/nginx/conf.d/default.conf" in DOCKERFILE


def test_demo_streams_are_unbuffered_and_download_links_hit_their_location():
    locations = nginx_locations()
    [sse] = [(match, body) for match, body in locations.items() if "generate" in match]
    pattern = re.compile(sse[0].removeprefix("~").strip())
    for url in (
        reverse("inference_demo:generate", args=["llama-demo"]),
        reverse("inference_demo:api_generate", args=["llama-demo"]),
    ):
        assert pattern.search(url), f"{url} would be buffered by nginx"
    assert "proxy_buffering off;" in sse[1]
    assert int(re.search(r"proxy_read_timeout (\d+)s;", sse[1])[1]) >= 120
    assert not pattern.search(reverse("inference_demo:page", args=["llama-demo"]))
    landing = reverse("weights:landing", args=[TOKEN])
    assert landing.startswith("/d/") and "/d/" in locations


def test_dockerfile_runs_as_a_user_and_ships_the_project():
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11-slim$", DOCKERFILE, re.M)
    app_stage = DOCKERFILE.split("AS app", 1)[1]
    assert re.search(r"^USER portal$", app_stage, re.M)
    assert 'CMD ["gunicorn", "-c", "deploy/gunicorn.conf.py"]' in app_stage
    for path in ("portal", "access", "weights", "inference_demo", "templates", "deploy"):
        assert re.search(rf"^COPY {path} {path}$", DOCKERFILE, re.M), path
        assert (ROOT / path).is_dir()
    assert "torch==2.13.0" in DOCKERFILE and "pip install -e ." in DOCKERFILE
    ignored = (ROOT / ".dockerignore").read_text().split()
    for path in (".env", ".venv", "var", ".git", "tests"):
        assert path in ignored, path
    # The demo model the demo worker loads travels in the image.
    assert "inference_demo/demo_model" not in ignored
    assert (ROOT / "inference_demo" / "demo_model" / "params.json").is_file()


def test_readme_documents_the_stack():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The services stack", 1)[1].split("\n## ", 1)[0]
    for needle in (
        "cp .env.example .env",
        "docker compose up --build",
        "COMPOSE_PROFILES",
        "--scale web=",
        "WEIGHTS_S3_ENDPOINT_URL",
    ):
        assert needle in section, needle


# --- the commands, run ------------------------------------------------------------------


def run(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        args,
        cwd=ROOT,
        env=process_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def get(port: int, path: str, headers: dict[str, str]) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers=headers)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> dict:
    """The compose environment on this machine: SQLite and local storage for the services
    that are not here; then the migrate one-shot, run exactly as compose runs it."""
    tmp = tmp_path_factory.mktemp("stack")
    env = service_env("migrate")
    env.update(
        DATABASE_URL=f"sqlite:///{tmp / 'db.sqlite3'}",
        REDIS_URL="",
        DEMO_TRANSPORT="inprocess",
        WEIGHTS_STORAGE="local",
        WEIGHTS_LOCAL_ROOT=str(tmp / "weights"),
        PORTAL_VAR_DIR=str(tmp / "var"),
        PORTAL_BOOTSTRAP_DEMO="1",
    )
    (tmp / "var").mkdir()
    result = run(argv(service("migrate")["command"]), env, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Demo data ready" in result.stdout  # the flag ran bootstrap_demo
    assert (tmp / "weights").is_dir()
    env.pop("PORTAL_BOOTSTRAP_DEMO")
    return {"tmp": tmp, "env": env}


def test_check_deploy_is_clean_with_the_compose_environment():
    env = service_env("web")
    result = run(
        ["python", "manage.py", "check", "--deploy", "--fail-level", "WARNING"], env, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_the_migrate_one_shot_skips_bootstrap_unless_asked(stack):
    result = run(argv(service("migrate")["command"]), {**stack["env"]}, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Demo data ready" not in result.stdout
    assert "No migrations to apply" in result.stdout


def gunicorn_env(stack: dict, port: int) -> dict[str, str]:
    """The web service's environment on this machine, one small worker on `port`."""
    web_env = service_env("web")
    env = {**stack["env"], **{k: web_env[k] for k in web_env if k.startswith("GUNICORN_")}}
    env.update(
        GUNICORN_BIND=f"127.0.0.1:{port}",
        GUNICORN_WORKERS="1",
        GUNICORN_THREADS="4",
        FORWARDED_ALLOW_IPS=web_env["FORWARDED_ALLOW_IPS"],
    )
    return env


@contextlib.contextmanager
def gunicorn_running(env: dict[str, str], port: int, log: Path) -> Iterator[subprocess.Popen]:
    """The web service's command, up once the compose health check passes on `port`."""
    with started(argv(service("web")["command"]), env=process_env(env), log=log) as gunicorn:
        # The compose health check, pointed at this port.
        health = [
            arg.replace("127.0.0.1:8000", f"127.0.0.1:{port}") for arg in healthcheck_argv("web")
        ]
        wait_for(lambda: run(health, env).returncode == 0, "gunicorn /healthz", log=log)
        assert gunicorn.poll() is None
        yield gunicorn


def test_gunicorn_serves_health_masks_tokens_and_nginx_fronts_it(stack):
    tmp, port = stack["tmp"], free_port()
    env = gunicorn_env(stack, port)
    token = issue_demo_link(stack["env"])
    log = tmp / "gunicorn.log"
    with gunicorn_running(env, port, log):
        host = {"Host": env["ALLOWED_HOSTS"].split(",")[0]}
        # Directly from a trusted peer: the forwarded client address is the one logged.
        status, headers, _ = get(
            port,
            f"/d/{TOKEN}/7B/consolidated.00.pth",
            {**host, "X-Forwarded-Proto": "https", "X-Forwarded-For": "198.51.100.7"},
        )
        assert status in (404, 410), status
        assert headers.get("X-Request-ID")
        # Without X-Forwarded-Proto: https the production settings redirect to HTTPS.
        status, headers, _ = get(port, "/", host)
        assert status == 301 and headers["Location"].startswith("https://")

        nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
        nginx_lines = run_nginx_in_front(nginx, port, tmp, host, token) if nginx else []

    gunicorn_log = log.read_text()
    for secret in (TOKEN, token):
        assert secret not in gunicorn_log and secret[:12] not in gunicorn_log
    assert re.search(
        r'^198\.51\.100\.7 "GET /d/<token>/7B/consolidated\.00\.pth HTTP/1\.1" 4',
        gunicorn_log,
        re.M,
    )
    if not nginx:
        skip_unless_required(
            "nginx is not installed (apt-get install nginx-light): conf not exercised"
        )
    assert nginx_lines


GRANT_SCRIPT = """
from django.contrib.auth import get_user_model
from access.models import Grant, LicenseAcceptance, LicenseVersion
from access.services.applications import application_save_draft, application_submit
from access.services.reviews import application_approve
from weights.models import Release
from weights.services.links import link_issue

users = get_user_model().objects
researcher, reviewer = users.get(username="researcher"), users.get(username="reviewer")
release = Release.objects.get(slug="llama-demo")
grant = Grant.objects.filter(user=researcher, release=release, revoked_at__isnull=True).first()
if grant is None:
    fields = {
        "full_name": "Rae Researcher", "institutional_email": researcher.email,
        "affiliation": "University of Example", "organisation_type": "academic",
        "country": "GB", "role": "Postdoctoral researcher",
        "intended_use": "Checking that the services stack serves weights through nginx.",
    }
    draft = application_save_draft(applicant=researcher, fields=fields, releases=[release])
    acceptance = LicenseAcceptance.objects.create(
        user=researcher, license_version=LicenseVersion.objects.get(version="1"),
        ip_address="127.0.0.1",
    )
    application = application_submit(
        application=draft, applicant=researcher, license_acceptance=acceptance
    )
    [grant] = application_approve(application=application, reviewer=reviewer, releases=[release])
print("TOKEN=" + link_issue(grant=grant).token)
"""


def issue_demo_link(env: dict[str, str]) -> str:
    """A researcher approved for the bootstrapped demo release (once), and a fresh link."""
    mail = {"EMAIL_BACKEND": "django.core.mail.backends.locmem.EmailBackend"}
    result = run(["python", "manage.py", "shell", "-c", GRANT_SCRIPT], {**env, **mail})
    assert result.returncode == 0, result.stdout + result.stderr
    return re.search(r"^TOKEN=(\S+)$", result.stdout, re.M)[1]


def run_nginx_in_front(
    nginx: str, upstream_port: int, tmp: Path, host: dict, token: str
) -> list[str]:
    """nginx in front of the gunicorn above: health, static, proxy headers,
    X-Accel-Redirect downloads with Range, the internal location, masked logs."""
    weights = tmp / "weights"
    with nginx_running(nginx, upstream_port, tmp, weights) as port:
        assert get(port, "/static/portal/probe.css", host)[0] == 200
        # Proxied with the client's scheme: plain HTTP is redirected, an outer TLS
        # terminator's X-Forwarded-Proto: https is believed.
        assert get(port, "/", host)[0] == 301
        status, headers, body = get(port, "/healthz", {**host, "X-Forwarded-Proto": "https"})
        assert status == 200 and headers.get("X-Request-ID"), body
        # A client cannot choose the logged address: nginx appends the one it saw.
        status, _, _ = get(
            port,
            f"/d/{TOKEN}/params.json",
            {
                **host,
                "X-Forwarded-Proto": "https",
                "X-Forwarded-For": "203.0.113.66",
                "Referer": f"https://x/d/{TOKEN}/",
            },
        )
        assert status in (404, 410)
        assert get(port, "/protected-weights/llama-demo/params.json", host)[0] == 404
        # A real link: Django checks it and charges the budget, nginx sends the bytes.
        source = (ROOT / "inference_demo" / "demo_model" / "params.json").read_bytes()
        [stored] = [f for f in weights.rglob("*") if f.is_file() and f.read_bytes() == source]
        secure = {**host, "X-Forwarded-Proto": "https"}
        status, headers, body = get(port, f"/d/{token}/params.json", secure)
        assert status == 200 and body == stored.read_bytes(), (status, body[:200])
        assert "X-Accel-Redirect" not in headers
        assert headers["Content-Disposition"].startswith("attachment")
        status, headers, body = get(
            port, f"/d/{token}/params.json", {**secure, "Range": "bytes=2-9"}
        )
        assert status == 206 and body == stored.read_bytes()[2:10]
        assert headers["Content-Range"] == f"bytes 2-9/{stored.stat().st_size}"
    access = (tmp / "nginx-access.log").read_text()
    assert '"uri":"/d/<token>/params.json"' in access
    assert '"referer":"https://x/d/<token>/"' in access
    errors = (tmp / "nginx-error.log").read_text() + (tmp / "nginx.log").read_text()
    assert TOKEN not in access + errors and token not in access + errors
    gunicorn_log = (tmp / "gunicorn.log").read_text()
    assert re.search(r'^127\.0\.0\.1 "GET /d/<token>/params\.json', gunicorn_log, re.M)
    return access.splitlines()


def link_spellings(token: str) -> list[tuple[str, int]]:
    """Spellings of one link's URLs and what the portal answers each. gunicorn decodes the
    path once (%2f included) into PATH_INFO and Django resolves that without touching dot
    segments, so the first six reach the link; nginx passes the spelling on as it came."""
    encoded = "".join(f"%{ord(c):02X}" for c in token)
    return [
        (f"/%64/{token}/", 200),
        (f"/d%2f{token}/", 200),
        (f"/d%2F{token}/manifest.json", 200),
        (f"/d/{encoded}/", 200),
        (f"/d/{token}%2fdownload.sh", 200),
        (f"/d/{token}/", 200),
        (f"/d/x/../{token}/", 404),
        (f"/d/x/%2e%2e/{token}/", 404),
        (f"/d/x/../../{token}", 404),
        (f"//d/{token}/", 404),
        (f"/%2564/{token}/", 404),
        (f"/accounts/login/?next=%2Fd%2F{token}%2F", 200),
    ]


def assert_token_absent(text: str, token: str) -> None:
    """Neither the token nor a prefix of it, raw or percent-encoded (once or twice)."""
    for _ in range(3):
        assert token not in text and token[:12] not in text
        text = unquote(text)


def test_no_spelling_of_a_link_reaches_the_gunicorn_or_nginx_logs(stack):
    tmp, port = stack["tmp"] / "spellings", free_port()
    tmp.mkdir()
    env = gunicorn_env(stack, port)
    token = issue_demo_link(stack["env"])
    host = {"Host": env["ALLOWED_HOSTS"].split(",")[0], "X-Forwarded-Proto": "https"}
    headers = {**host, "Referer": f"https://portal.example/%64/{token}/"}
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")
    log = tmp / "gunicorn.log"
    with gunicorn_running(env, port, log):
        answered = [(path, get(port, path, headers)[0]) for path, _ in link_spellings(token)]
        assert answered == link_spellings(token)
        if nginx:
            with nginx_running(nginx, port, tmp, stack["tmp"] / "weights") as front:
                proxied = [(p, get(front, p, headers)[0]) for p, _ in link_spellings(token)]
            assert proxied == link_spellings(token)

    gunicorn_log = log.read_text()
    assert_token_absent(gunicorn_log, token)
    # Logged as routed: decoded, then masked.
    assert gunicorn_log.count('"GET /d/<token>/') >= 6, gunicorn_log
    assert '"GET /accounts/login/?next=/d/<token>/ HTTP/1.1" 200' in gunicorn_log
    assert '"https://portal.example/d/<token>/"' in gunicorn_log
    if not nginx:
        skip_unless_required(
            "nginx is not installed (apt-get install nginx-light): conf not exercised"
        )
    access = (tmp / "nginx-access.log").read_text()
    assert_token_absent(access + (tmp / "nginx-error.log").read_text(), token)
    assert_token_absent((tmp / "nginx.log").read_text(), token)
    uris = [json.loads(line)["uri"] for line in access.splitlines()]
    assert uris[:6] == [
        "/d/<token>/",
        "/d/<token>/",
        "/d/<token>/manifest.json",
        "/d/<token>/",
        "/d/<token>/download.sh",
        "/d/<token>/",
    ]
    assert uris[-1] == "/accounts/login/?<masked>"


def test_healthcheck_script_fresh_mode(tmp_path):
    script = ["python", "deploy/healthcheck.py", "fresh", str(tmp_path / "beat*"), "900"]
    assert run(script, {}).returncode == 1
    (tmp_path / "beat-schedule").write_text("x")
    assert run(script, {}).returncode == 0
    old = time.time() - 3600
    os.utime(tmp_path / "beat-schedule", (old, old))
    assert run(script, {}).returncode == 1


def test_minio_bucket_script_creates_the_bucket_and_a_bucket_only_user(tmp_path):
    calls = tmp_path / "calls"
    fake = tmp_path / "bin" / "mc"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexit 0\n')
    fake.chmod(0o755)
    env = service_env("minio-bucket")
    env.update(PATH=f"{fake.parent}:/usr/bin:/bin", TMPDIR=str(tmp_path))
    script = ROOT / "deploy" / "minio-bucket.sh"
    mounted = SERVICES["minio-bucket"]["volumes"][0].split(":")
    assert ROOT / mounted[0] == script and mounted[1] == "/deploy/minio-bucket.sh"
    result = subprocess.run(
        ["sh", str(script)], env=env, capture_output=True, text=True, check=False, timeout=20
    )
    assert result.returncode == 0, result.stderr
    lines = calls.read_text().splitlines()
    bucket, user = env["WEIGHTS_S3_BUCKET"], env["WEIGHTS_S3_ACCESS_KEY_ID"]
    assert lines[0].startswith(f"alias set local http://minio:9000 {env['MINIO_ROOT_USER']} ")
    assert f"mb --ignore-existing local/{bucket}" in lines
    assert f"anonymous set none local/{bucket}" in lines
    assert f"admin user add local {user} {env['WEIGHTS_S3_SECRET_ACCESS_KEY']}" in lines
    assert f"admin policy attach local portal-weights --user {user}" in lines
    policy = json.loads((tmp_path / "portal-weights-policy.json").read_text())
    resources = {r for statement in policy["Statement"] for r in statement["Resource"]}
    assert resources == {f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"}


@pytest.mark.services
def test_celery_services_start_and_pass_their_health_checks(stack, redis_url, tmp_path):
    """worker, demo-worker-cpu and beat, as compose starts them, on a Redis database of
    their own; each passes its own health check (inspect ping / fresh schedule file)."""
    url = urlsplit(redis_url)
    env = {
        **stack["env"],
        "REDIS_URL": url._replace(path="/14").geturl(),
        "DEMO_TRANSPORT": "redis",
        "HOSTNAME": socket.gethostname(),
    }
    schedule = "/tmp/celerybeat-schedule"
    beat_args = argv(service("beat")["command"])
    beat_check = healthcheck_argv("beat")
    assert schedule in beat_args and f"{schedule}*" in beat_check
    beat_args = [arg.replace(schedule, str(tmp_path / "schedule")) for arg in beat_args]
    beat_check = [arg.replace(schedule, str(tmp_path / "schedule")) for arg in beat_check]
    names = ("worker", "demo-worker-cpu")
    with contextlib.ExitStack() as processes:
        for name in names:
            demo_env = {**env, **{"DEMO_DEVICE": service_env(name).get("DEMO_DEVICE", "auto")}}
            processes.enter_context(
                started(
                    argv(service(name)["command"]),
                    env=process_env(demo_env),
                    log=tmp_path / f"{name}.log",
                )
            )
        processes.enter_context(started(beat_args, env=process_env(env), log=tmp_path / "beat.log"))
        for name in names:
            log = tmp_path / f"{name}.log"
            # A ping before the worker is up waits out its whole timeout: wait for "ready".
            wait_for(lambda log=log: " ready." in log.read_text(), name, log=log, timeout=60)
            check = run(healthcheck_argv(name), env, timeout=30)
            assert check.returncode == 0, f"{name}: {check.stdout}{check.stderr}"
            assert "pong" in check.stdout
        wait_for(lambda: run(beat_check, env).returncode == 0, "beat", log=tmp_path / "beat.log")
