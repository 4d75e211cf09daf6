"""Scenario llamacpp: the portal's OpenAI backend against llama.cpp's server, over HTTP.

1. var/llamacpp-venv gets llama-cpp-python[server] built from its PyPI sdist (it has no
   wheel), once: the sdist is checked against a pinned SHA-256, the build is niced, bounded
   and logged to var/llamacpp/build.log, and a stamp records the version, CMake arguments
   and build time, so later runs reuse it ("cached").
2. The bundled demo model goes to a Hugging Face directory (inference_demo.convert, float32:
   the bf16 weights widen exactly) and then to a GGUF f32 file with the sdist's own
   convert_hf_to_gguf.py. The converter runs under the project's python, which already has
   what it imports (torch, transformers, sentencepiece, numpy, tqdm, yaml); the converter
   puts the sdist's gguf-py first on sys.path itself. Nothing is installed into either
   venv for it, and var/llamacpp-venv stays without torch.
3. `python -m llama_cpp.server` serves the GGUF on a free loopback port with an API key
   and a small context (N_CTX), so a long prompt can overflow it.
4. tests/inference_demo/prove_llamacpp_backend.py runs under pytest with the test settings
   `make test` uses, pointed at the server by LLAMACPP_* variables; it writes its figures
   (greedy agreement, the context refusal) to a JSON file this scenario reports.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import secrets
import shutil
import subprocess
import sys
import tarfile
import time
from datetime import UTC, datetime
from pathlib import Path
from xml.etree import ElementTree

from prove.stack import REPO, StackError, free_port, http_get, wait_for

VERSION = "0.3.36"
SDIST = f"llama_cpp_python-{VERSION}.tar.gz"
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
# The tests, examples, tools and the multimodal library are not needed to serve text.
CMAKE_ARGS = (
    "-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
    "-DLLAMA_BUILD_TOOLS=OFF -DLLAVA_BUILD=OFF"
)
CACHE = REPO / "var" / "llamacpp"
VENV = REPO / "var" / "llamacpp-venv"
STAMP = VENV / ".prove-built.json"
BUILD_LOG = CACHE / "build.log"
DEMO_DIR = REPO / "inference_demo" / "demo_model"
TESTS = "tests/inference_demo/prove_llamacpp_backend.py"

BUILD_LIMIT_S = 1800  # 9-10 min on this 2-core VM; a hung build must not hold the run
BUILD_ESTIMATE_S = 900
RUN_ESTIMATE_S = 240  # sdist check, conversion, server start and the tests
STEP_LIMIT_S = 300
SERVER_START_S = 90
N_CTX = 512
MODEL_ALIAS = "demo-gguf"


def _venv_python() -> Path:
    return VENV / "bin" / "python"


def _stamp() -> dict | None:
    try:
        stamp = json.loads(STAMP.read_text())
    except (OSError, ValueError):
        return None
    same = stamp.get("version") == VERSION and stamp.get("cmake_args") == CMAKE_ARGS
    return stamp if same and _venv_python().exists() else None


def needs_s() -> float:
    """What the scenario needs of the run's time: the build only when nothing is cached."""
    return RUN_ESTIMATE_S + (0 if _stamp() else BUILD_ESTIMATE_S)


def _clean_env(**extra: str) -> dict[str, str]:
    """The caller's environment without settings meant for the portal or another python."""
    prefixes = ("DJANGO_", "PORTAL_", "DEMO_", "DATABASE_", "REDIS_", "CELERY_", "PYTHON")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.pop("VIRTUAL_ENV", None)
    env.update(extra)
    return env


def _run(what: str, command: list[str], *, timeout: float, env: dict | None = None, log=None):
    """Run one bounded step; a failure says which step, with the end of its output."""
    try:
        result = subprocess.run(  # noqa: S603 - our own interpreters and arguments
            command,
            cwd=REPO,
            env=env or _clean_env(),
            stdin=subprocess.DEVNULL,
            stdout=log or subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        raise StackError(f"{what} did not finish within {timeout:.0f} s") from None
    if result.returncode:
        tail = (result.stdout or "")[-800:] if log is None else _tail(Path(log.name))
        raise StackError(f"{what} failed (exit {result.returncode}): {tail}")
    return result


def _tail(path: Path, chars: int = 800) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _sdist() -> Path:
    """The sdist under var/llamacpp/, downloaded once and checked against the pin."""
    path = CACHE / SDIST
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        download = CACHE / "download"
        shutil.rmtree(download, ignore_errors=True)
        _run(
            "downloading the llama-cpp-python sdist",
            [str(_venv_python()), "-m", "pip", "download", "--no-deps", "--no-cache-dir"]
            + ["--no-binary", "llama-cpp-python", "-d", str(download)]
            + [f"llama-cpp-python=={VERSION}"],
            timeout=STEP_LIMIT_S,
        )
        (download / SDIST).replace(path)
        shutil.rmtree(download, ignore_errors=True)
    if (digest := _sha256(path)) != SDIST_SHA256:
        path.unlink()
        raise StackError(f"{SDIST} has SHA-256 {digest}, expected {SDIST_SHA256}; removed it")
    return path


def _build(limit_s: float) -> dict:
    """A fresh var/llamacpp-venv with llama-cpp-python[server] built from the sdist."""
    shutil.rmtree(VENV, ignore_errors=True)  # a half-built venv from an interrupted run
    _run("creating var/llamacpp-venv", [sys.executable, "-m", "venv", str(VENV)], timeout=120)
    sdist = _sdist()
    env = _clean_env(CMAKE_ARGS=CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 1))
    nice = ["nice", "-n", "10"] if shutil.which("nice") else []
    # --no-cache-dir: pip's wheel cache ignores CMAKE_ARGS, so a wheel built with other
    # flags could be taken silently; this venv under var/ is the cache instead.
    command = [*nice, str(_venv_python()), "-m", "pip", "install", "-v", "--no-cache-dir"]
    command.append(f"llama_cpp_python[server] @ {sdist.as_uri()}")
    started = time.monotonic()
    with BUILD_LOG.open("w") as log:
        _run("building llama-cpp-python", command, timeout=limit_s, env=env, log=log)
    build_s = round(time.monotonic() - started, 1)
    _check_import()
    stamp = {
        "version": VERSION,
        "cmake_args": CMAKE_ARGS,
        "build_s": build_s,
        "jobs": os.cpu_count(),
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    }
    STAMP.write_text(json.dumps(stamp) + "\n")
    return {"build": "built", "build_s": build_s, "build_log": str(BUILD_LOG)}


def _check_import() -> None:
    result = _run(
        "importing llama_cpp",
        [str(_venv_python()), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
        timeout=60,
    )
    if result.stdout.strip() != VERSION:
        raise StackError(f"var/llamacpp-venv has llama_cpp {result.stdout.strip()!r}")


def ensure_venv(limit_s: float) -> dict:
    if (stamp := _stamp()) is not None:
        try:
            _check_import()
        except StackError:
            pass  # broken (say, the base python moved): build it again
        else:
            return {"build": "cached", "build_s": stamp["build_s"], "built_on": stamp["date"]}
    return _build(limit_s)


def converter() -> Path:
    """vendor/llama.cpp's convert_hf_to_gguf.py with its conversion and gguf-py packages."""
    target = CACHE / f"convert-{VERSION}"
    script = target / "convert_hf_to_gguf.py"
    if script.exists():
        return script
    sdist = _sdist()
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    staging = CACHE / "convert-staging"
    shutil.rmtree(staging, ignore_errors=True)
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers() if m.name.removeprefix(prefix).startswith(wanted)]
        tar.extractall(staging, members=members, filter="data")
    shutil.rmtree(target, ignore_errors=True)
    (staging / prefix).replace(target)
    shutil.rmtree(staging, ignore_errors=True)
    return script


def convert(work: Path) -> dict:
    """Demo model -> Hugging Face directory -> GGUF f32; both steps timed together."""
    started = time.monotonic()
    hf, gguf = work / "hf", work / "demo-f32.gguf"
    _run(
        "converting the demo model to Hugging Face (inference_demo.convert)",
        [sys.executable, "-m", "inference_demo.convert", str(DEMO_DIR), str(hf)]
        + ["--dtype", "float32"],
        timeout=STEP_LIMIT_S,
    )
    _run(
        "converting to GGUF (convert_hf_to_gguf.py)",
        [sys.executable, "-s", str(converter()), str(hf), "--outtype", "f32"]
        + ["--outfile", str(gguf)],
        timeout=STEP_LIMIT_S,
    )
    return {
        "gguf": gguf,
        "conversion_s": round(time.monotonic() - started, 1),
        "gguf_mib": round(gguf.stat().st_size / 2**20, 1),
    }


def _models_listed(port: int, api_key: str) -> bool:
    try:
        status, _, body = http_get(port, "/v1/models", {"Authorization": f"Bearer {api_key}"}, 2)
    except (OSError, http.client.HTTPException):
        return False
    return status == 200 and MODEL_ALIAS.encode() in body


def start_server(run, gguf: Path):
    port, api_key = free_port(), secrets.token_urlsafe(18)
    base_url = f"http://127.0.0.1:{port}/v1"
    command = [str(_venv_python()), "-m", "llama_cpp.server", "--model", str(gguf)]
    command += ["--host", "127.0.0.1", "--port", str(port), "--model_alias", MODEL_ALIAS]
    command += ["--api_key", api_key, "--n_ctx", str(N_CTX), "--use_mlock", "False"]
    command += ["--n_threads", str(min(2, os.cpu_count() or 1))]
    started = time.monotonic()
    # Unbuffered: the tests read what the server prints when a client goes away.
    env = _clean_env(PYTHONUNBUFFERED="1")
    server = run.stack.spawn("llamacpp", command, env=env, port=port)
    up = wait_for(lambda: not server.alive() or _models_listed(port, api_key), SERVER_START_S)
    if not (up and server.alive()):
        server.stop()
        raise RuntimeError(f"llama_cpp.server did not list {MODEL_ALIAS}: {server.tail(30)}")
    return server, base_url, api_key, round(time.monotonic() - started, 1)


def _junit(path: Path) -> dict:
    try:
        suite = ElementTree.parse(path).getroot()  # noqa: S314 - our own pytest's report
    except (OSError, ElementTree.ParseError):
        return {"passed": 0, "failed": 0, "errors": 1, "skipped": 0, "failures": ["no report"]}
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failures = [
        f"{case.get('name')}: {(bad.get('message') or '')[:200]}"
        for case in suite.iter("testcase")
        for bad in (case.find("failure"), case.find("error"))
        if bad is not None
    ]
    bad = counts["failures"] + counts["errors"]
    return {
        "passed": counts["tests"] - bad - counts["skipped"],
        "failed": counts["failures"],
        "errors": counts["errors"],
        "skipped": counts["skipped"],
        "failures": failures,
    }


def run_tests(run, base_url: str, api_key: str, server_log: Path) -> dict:
    work = run.stack.root / "llamacpp"
    junit, report = work / "junit.xml", work / "figures.json"
    env = _clean_env(
        LLAMACPP_BASE_URL=base_url,
        LLAMACPP_MODEL=MODEL_ALIAS,
        LLAMACPP_API_KEY=api_key,
        LLAMACPP_N_CTX=str(N_CTX),
        LLAMACPP_SERVER_LOG=str(server_log),
        LLAMACPP_REPORT=str(report),
    )
    command = [sys.executable, "-m", "pytest", TESTS, "-q", "-p", "no:cacheprovider"]
    command.append(f"--junitxml={junit}")
    started = time.monotonic()
    try:
        result = subprocess.run(  # noqa: S603
            command,
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=STEP_LIMIT_S,
        )
        tail = result.stdout[-1500:]
    except subprocess.TimeoutExpired:
        tail = f"pytest did not finish within {STEP_LIMIT_S} s"
    try:
        figures = json.loads(report.read_text())
    except (OSError, ValueError):
        figures = {}
    return {
        "tests": _junit(junit),
        "tests_s": round(time.monotonic() - started, 1),
        "figures": figures,
        "pytest_tail": tail,
    }


def llamacpp_scenario(run) -> dict:
    work = run.stack.root / "llamacpp"
    work.mkdir(parents=True, exist_ok=True)
    build = ensure_venv(min(BUILD_LIMIT_S, max(60.0, run.left() - RUN_ESTIMATE_S)))
    converted = convert(work)
    server, base_url, api_key, start_s = start_server(run, converted["gguf"])
    try:
        tested = run_tests(run, base_url, api_key, server.log)
    finally:
        server.stop()
    tests = tested["tests"]
    ok = tests["passed"] > 0 and not (tests["failed"] or tests["errors"] or tests["skipped"])
    record = {
        "status": "ok" if ok else "failed",
        "server": f"llama-cpp-python {VERSION} (llama_cpp.server), n_ctx {N_CTX}, CPU",
        "cmake_args": CMAKE_ARGS,
        **build,
        "conversion_s": converted["conversion_s"],
        "gguf": f"f32, {converted['gguf_mib']} MiB",
        "server_start_s": start_s,
        "tests_s": tested["tests_s"],
        "tests": tests,
        **tested["figures"],
    }
    if not ok:
        record["pytest_tail"] = tested["pytest_tail"]
    return record
