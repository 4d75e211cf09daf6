"""Real download clients for tests: wget, curl, aria2c and the project CLI, each run as a
researcher would (resume flag, rate limit), and runs cut short by SIGKILL once the partial
file has grown past a size, as a dropped connection or a closed laptop would end them."""

from __future__ import annotations

import os
import posixpath
import shutil
import signal
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from tests.servers import ROOT, process_env

POLL_S = 0.01
RUN_TIMEOUT_S = 10  # a 32 MiB file at 16 MiB/s takes 2 s; a stalled transfer fails
T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    """One file behind a link: the landing page the CLI takes, the file URL the others take."""

    landing: str
    file: str
    path: str  # the file's path in the release, e.g. 7B/consolidated.00.pth


class Client(ABC):
    """A client run with its resume flag; `tool` is the command require_tools looks for."""

    name = ""
    tool = ""

    @abstractmethod
    def argv(
        self, target: Target, dest: Path, *, headers: Mapping[str, str], rate: int
    ) -> list[str]:
        """The command line that downloads `target` into `dest` at `rate` bytes/s."""

    def partial(self, target: Target, dest: Path) -> Path:
        """The file that grows while the client runs."""
        return self.final(target, dest)

    def final(self, target: Target, dest: Path) -> Path:
        return dest / posixpath.basename(target.path)


class Wget(Client):
    name = tool = "wget"

    def argv(self, target, dest, *, headers, rate):
        extra = [f"--header={name}: {value}" for name, value in headers.items()]
        out = str(self.final(target, dest))
        options = ["--no-config", "-q", "-c", "--tries=3", f"--limit-rate={rate}", *extra]
        return ["wget", *options, "-O", out, target.file]


class Curl(Client):
    name = tool = "curl"

    def argv(self, target, dest, *, headers, rate):
        extra = [arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")]
        out = str(self.final(target, dest))
        options = ["-q", "-sS", "--fail", "-L", "-C", "-", "--limit-rate", str(rate), *extra]
        return ["curl", *options, "-o", out, target.file]


class Aria2c(Client):
    name = tool = "aria2c"

    def argv(self, target, dest, *, headers, rate):
        return aria2c(target, dest, headers=headers) + [
            "-c",
            "-x1",
            "-s1",
            # Written as it arrives, so the partial file's size is the progress.
            "--file-allocation=none",
            f"--max-download-limit={rate}",
            target.file,
        ]


class ProjectCli(Client):
    name = "cli"
    tool = sys.executable

    def argv(self, target, dest, *, headers, rate):
        # The CLI sends no extra headers: it must work with the plain link from the email.
        options = ["--dest", str(dest), "--limit-rate", str(rate), "--quiet"]
        return [sys.executable, "-m", "weights.download", target.landing, *options]

    def partial(self, target, dest):
        final = self.final(target, dest)
        return final.with_name(final.name + ".part")

    def final(self, target, dest):
        return dest.joinpath(*target.path.split("/"))


CLIENTS = (Wget(), Curl(), Aria2c(), ProjectCli())


def aria2c(target: Target, dest: Path, *, headers: Mapping[str, str]) -> list[str]:
    """aria2c's common options: no config file, quiet, three tries, into dest."""
    extra = [f"--header={name}: {value}" for name, value in headers.items()]
    name = posixpath.basename(target.path)
    options = ["--no-conf", "-q", "--max-tries=3", "--retry-wait=0", *extra]
    return ["aria2c", *options, "-d", str(dest), "-o", name]


def curl_once(url: str, out: Path, *, address: str, headers: Mapping[str, str]) -> tuple[int, int]:
    """One plain curl download from the local `address` (Linux routes all of 127/8 to lo):
    (the last HTTP status it saw, its exit status). With --fail, a refusal writes nothing."""
    extra = [arg for name, value in headers.items() for arg in ("-H", f"{name}: {value}")]
    argv = ["curl", "-q", "-sS", "--fail", "-L", "--max-time", str(RUN_TIMEOUT_S)]
    argv += ["--interface", address, *extra]
    argv += ["-o", str(out), "-w", "%{http_code}", url]
    result = subprocess.run(
        argv, cwd=ROOT, env=process_env({}), capture_output=True, text=True, timeout=60
    )
    return int(result.stdout.strip() or 0), result.returncode


@dataclass(frozen=True)
class Run:
    status: int | None  # None: killed by the test, on purpose or because it stalled
    on_disk: int  # bytes in the watched file when it ended
    stalled: bool = False  # still running after RUN_TIMEOUT_S

    def __str__(self) -> str:
        if self.status == 0:
            return "exit 0"
        ended = "killed" if self.status is None else f"exit {self.status}"
        return f"{'stalled, ' if self.stalled else ''}{ended} at {self.on_disk} B"


def run_client(argv: list[str], watched: Path, *, log: Path, kill_past: int | None = None) -> Run:
    """Run `argv` in a session of its own, output appended to `log`. With `kill_past`, its
    whole process group gets SIGKILL once `watched` holds more bytes than that; so does a
    run still going after RUN_TIMEOUT_S (a transfer the server left hanging)."""
    with log.open("a") as out:
        out.write(f"$ {' '.join(argv)}\n")
        out.flush()
        process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=process_env({}),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        while process.poll() is None:
            if kill_past is not None and size(watched) > kill_past:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return Run(status=None, on_disk=size(watched))
            if time.monotonic() > deadline:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                return Run(status=None, on_disk=size(watched), stalled=True)
            time.sleep(POLL_S)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return Run(status=process.returncode, on_disk=size(watched))


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def eventually(read: Callable[[], T], done: Callable[[T], bool], *, timeout: float = 3.0) -> T:
    """The value of `read()` once `done` accepts it, or its last value after `timeout` s:
    for what the server writes just after a client has its last byte."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if done(value) or time.monotonic() >= deadline:
            return value
        time.sleep(0.05)


SCRIPT_TOOLS = ("sh", "wget", "curl", "mkdir", "dirname", "basename", "cat", "wc", "rm", "sed")
SCRIPT_TOOLS += ("md5sum", "sha256sum", "touch")  # touch: so an injected command would work


def tool_dir(parent: Path, without: str) -> Path:
    """A PATH directory with what download.sh may use, minus one downloader."""
    bin_dir = parent / f"bin-no-{without}"
    if bin_dir.is_dir():
        return bin_dir
    bin_dir.mkdir()
    for tool in SCRIPT_TOOLS:
        found = shutil.which(tool)
        if tool != without and found:
            (bin_dir / tool).symlink_to(found)
    return bin_dir


def run_download_sh(script: bytes, dest: Path, cwd: Path, tool: str) -> subprocess.CompletedProcess:
    """Run a landing page's download.sh with only ``tool`` (wget or curl) to fetch with."""
    (cwd / "download.sh").write_bytes(script)
    other = "curl" if tool == "wget" else "wget"
    env = {**os.environ, "PATH": str(tool_dir(cwd, other)), "NO_PROXY": "127.0.0.1"}
    return subprocess.run(
        ["sh", "./download.sh", str(dest)], cwd=cwd, env=env, capture_output=True, text=True
    )
