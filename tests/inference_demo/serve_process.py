"""``python -m inference_demo.serve`` as a real process, for the tests that talk to it."""

from __future__ import annotations

import contextlib
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 120


class Server:
    def __init__(
        self, process: subprocess.Popen[str], base_url: str, log: Path, api_key: str
    ) -> None:
        self.process, self.base_url, self.log, self.api_key = process, base_url, log, api_key

    def client(self, api_key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(
            base_url=self.base_url, api_key=api_key or self.api_key, max_retries=0, timeout=60
        )

    def log_lines(self) -> list[str]:
        return self.log.read_text().splitlines()


@contextlib.contextmanager
def serve_process(
    model_dir: Path, log: Path, *, model_name: str, api_key: str, extra: tuple[str, ...] = ()
) -> Iterator[Server]:
    """The server on a free loopback port, once it printed its address; stopped after."""
    with log.open("w") as stderr:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "inference_demo.serve",
                str(model_dir),
                "--port",
                "0",
                "--model-name",
                model_name,
                "--api-key",
                api_key,
                "--device",
                "cpu",
                *extra,
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    try:
        line = _first_line(process)
        match = re.search(r"at (http://\S+/v1)$", line)
        assert match, f"unexpected start line {line!r}: {log.read_text()}"
        yield Server(process, match.group(1), log, api_key)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _first_line(process: subprocess.Popen[str]) -> str:
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.append(process.stdout.readline()), daemon=True)
    reader.start()
    reader.join(START_TIMEOUT_S)
    assert lines and lines[0], "the server did not start"
    return lines[0].strip()
