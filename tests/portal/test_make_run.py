"""What `make run` does after installing: migrate, bootstrap_demo, serve. Run as a newcomer would."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request

from tests.servers import ROOT, free_port, started, wait_for


def test_embedded_mode_migrates_bootstraps_and_serves(tmp_path):
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("DJANGO_", "PORTAL_", "DATABASE_", "REDIS_", "WEIGHTS_", "DEMO_"))
    }
    env.update(DJANGO_SETTINGS_MODULE="portal.settings", PORTAL_VAR_DIR=str(tmp_path / "var"))
    (tmp_path / "var").mkdir()  # as the Makefile's `mkdir -p var`
    manage = [sys.executable, "manage.py"]

    def run(*args: str) -> str:
        result = subprocess.run(
            [*manage, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    run("migrate", "--noinput")
    # Rate-limit counters live in the cache, which every process must share (the workers).
    cache = "from django.core.cache import cache; "
    run("shell", "-c", cache + "cache.set('seen-by-all', 'yes')")
    assert run("shell", "-c", cache + "print(cache.get('seen-by-all'))").split()[-1] == "yes"
    printed = run("bootstrap_demo")
    assert "researcher@uni.example.edu" in printed and "password:" in printed
    assert "Published llama-demo" in printed
    assert "Published" not in run("bootstrap_demo")  # running it twice is safe

    port = free_port()

    def releases_page() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/releases/", timeout=5) as page:
            return page.read().decode()

    log = tmp_path / "runserver.log"
    with started([*manage, "runserver", "--noreload", f"127.0.0.1:{port}"], env=env, log=log):
        wait_for(releases_page, "runserver", log=log, timeout=60)
        body = releases_page()
        assert "LLaMA 65B" in body and "LLaMA demo" in body
        assert (tmp_path / "var" / "db.sqlite3").exists()
