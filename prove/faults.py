"""Fault scenarios: a worker killed mid-task, Redis, PostgreSQL and S3 going away.

Each one stops only the private service it started (prove.stack) and says what the
portal did: HTTP statuses seen, rows and emails counted before and after recovery.
"""

from __future__ import annotations

import contextlib
import http.client
import signal
import subprocess
import sys
import time
from pathlib import Path

from prove.s3 import BUCKET, s3_env
from prove.stack import REPO, StackError, http_get, http_request, wait_for

SLUG = "llama-7b"
CLAIM_TIMEOUT = "10"  # PORTAL_OUTBOX_CLAIM_TIMEOUT_SECONDS: the shortest the portal allows
VISIBILITY = "15"  # broker redelivery of unacked messages (portal default: Redis's 1 h)


def _mail_dir(run) -> Path:
    return run.stack.root / "var" / "mail"


def _eml_count(run) -> int:
    return len(list(_mail_dir(run).glob("*.eml")))


# --------------------------------------------------------------------------- (a) kill -9


def _kill_worker_once(run, phase: str) -> dict:
    stack = run.stack
    stack.redis_flush()
    markers = stack.root / f"markers-{phase}"
    base = {
        "PROVE_VISIBILITY_TIMEOUT": VISIBILITY,
        "PORTAL_OUTBOX_CLAIM_TIMEOUT_SECONDS": CLAIM_TIMEOUT,
    }
    slow = stack.env(
        **base,
        PROVE_MAIL_DELAY_S="60",
        PROVE_MAIL_PHASE=phase,
        PROVE_MAIL_MARKERS=str(markers),
    )
    normal = stack.env(**base)
    prefix = f"kill{phase}"
    worker = stack.start_worker(slow, name=f"slow{phase}")
    eml_before = _eml_count(run)
    submitted = stack.internal("submit_and_approve", env=normal, prefix=prefix, count=1, slug=SLUG)[
        "submitted"
    ]
    if not wait_for(lambda: markers.exists() and any(markers.iterdir()), 60):
        worker.stop(signal.SIGKILL)
        raise RuntimeError(f"no task reached the mail backend: {worker.tail()}")
    time.sleep(0.5)
    in_flight = len(list(markers.iterdir()))
    worker.stop(signal.SIGKILL)  # kill -9 the worker and its pool processes
    killed_at = time.monotonic()
    usernames = [f"{prefix}0"]
    after_kill = stack.internal("counts", env=normal, usernames=usernames, mail_dir="")
    replacement = stack.start_worker(normal, name=f"after{phase}")
    try:
        # beat would run the sweep every 5 min; a claim older than the timeout is retried
        time.sleep(max(0.0, killed_at + int(CLAIM_TIMEOUT) + 1 - time.monotonic()))
        swept = stack.internal("sweep", env=normal)
        # let the broker redeliver the unacked messages of the dead worker (visibility
        # timeout + kombu's 10 s restore cycle): they must be no-ops now
        time.sleep(max(0.0, killed_at + int(VISIBILITY) + 15 - time.monotonic()))
        final = stack.internal(
            "counts", env=normal, usernames=usernames, mail_dir=str(_mail_dir(run))
        )
    finally:
        replacement.stop()
    expected_emails = final["user_notifications"] + len(final["per_grant"])
    applicant_mail = final["eml_per_recipient"].get(submitted[0]["email"], 0)
    links_ok = all(g["links_emailed"] == 1 for g in final["per_grant"].values())
    delta = _eml_count(run) - eml_before
    exactly_once = (
        final["user_notifications_sent"] == final["user_notifications"]
        and links_ok
        and applicant_mail == 3
    )
    return {
        "kill_point": "before the message is written"
        if phase == "before"
        else "after the message is written, before the task finished",
        "sends_in_flight_when_killed": in_flight,
        "after_kill": {
            "applicant_notifications_sent": after_kill["user_notifications_sent"],
            "applicant_notifications": after_kill["user_notifications"],
            "per_grant": after_kill["per_grant"],
        },
        "sweep": swept,
        "final_per_grant": final["per_grant"],
        "applicant_notifications_sent": f"{final['user_notifications_sent']}/{final['user_notifications']}",
        "applicant_emails": applicant_mail,
        "applicant_emails_expected": 3,
        "all_eml_written_during_scenario": delta,
        "expected_new_emails_min": expected_emails,
        "exactly_once": exactly_once,
    }


def kill_worker(run) -> dict:
    before = _kill_worker_once(run, "before")
    after = _kill_worker_once(run, "after")
    ok = before["exactly_once"]
    return {
        "status": "ok" if ok else "failed",
        "killed_before_send": before,
        "killed_after_send": after,
        "note": "killed after the SMTP hand-off but before the row is marked sent, a message "
        "is sent again by the sweep (at-least-once window); see docs/reliability.md",
    }


# --------------------------------------------------------------------------- (b) Redis down


def _submit(port: int, draft: dict) -> dict:
    t0 = time.perf_counter()
    try:
        status, body = http_request(
            port,
            "POST",
            f"/api/applications/{draft['application']}/submit/",
            body={"accept_license": True},
            headers={"Authorization": f"Token {draft['api_token']}"},
        )
    except (OSError, http.client.HTTPException) as exc:
        status, body = 0, f"{type(exc).__name__}: {exc}".encode()
    return {
        "user": draft["user"],
        "status": status,
        "ms": round((time.perf_counter() - t0) * 1000),
        "body": body[:160].decode("utf-8", "replace"),
    }


def redis_down(run) -> dict:
    stack = run.stack
    stack.redis_flush()
    env = stack.env(PORTAL_OUTBOX_CLAIM_TIMEOUT_SECONDS=CLAIM_TIMEOUT)
    drafts = stack.internal("drafts", env=env, prefix="redis", count=9, slug=SLUG)["drafts"]
    usernames = [d["user"] for d in drafts]
    server = stack.start_gunicorn(env)
    worker = stack.start_worker(env, name="redis")
    try:
        eml_before = _eml_count(run)
        up = [_submit(server.port, d) for d in drafts[:3]]
        stack.stop_redis()
        down = [_submit(server.port, d) for d in drafts[3:6]]
        trivial_down = http_get(server.port, "/_prove/trivial/")[0]
        stack.start_redis()
        time.sleep(1)
        back = [_submit(server.port, d) for d in drafts[6:]]
        retried = [
            _submit(server.port, drafts[3 + i]) for i, r in enumerate(down) if r["status"] != 200
        ]

        def delivered() -> bool:
            c = stack.internal("counts", env=env, usernames=usernames)
            return (
                c["user_notifications"] > 0
                and c["user_notifications_sent"] == c["user_notifications"]
            )

        first_wait = wait_for(delivered, 20, step=2)
        time.sleep(int(CLAIM_TIMEOUT))
        swept = stack.internal("sweep", env=env)
        wait_for(delivered, 20, step=2)
        final = stack.internal("counts", env=env, usernames=usernames, mail_dir=str(_mail_dir(run)))
    finally:
        worker.stop()
        server.stop()
        if not (stack.redis and stack.redis.alive()):
            stack.start_redis()
    accepted = [r for r in up + down + back + retried if r["status"] == 200]
    submitted_users = {r["user"] for r in accepted}
    lost = [u for u in usernames if u not in submitted_users]
    emails_to_applicants = sum(final.get("eml_per_recipient", {}).values())
    ok = (
        not lost
        and final["user_notifications_sent"] == final["user_notifications"]
        and emails_to_applicants == len(submitted_users)
        and all(r["status"] == 200 for r in down)
    )
    return {
        "status": "ok" if ok else "failed",
        "submit_with_redis_up": up,
        "submit_with_redis_down": down,
        "trivial_view_with_redis_down": trivial_down,
        "submit_after_redis_back": back,
        "retried_after_redis_back": retried,
        "delivered_by_worker_without_sweep": first_wait,
        "sweep": swept,
        "applications_submitted": f"{len(submitted_users)}/{len(usernames)}",
        "notifications_sent": f"{final['user_notifications_sent']}/{final['user_notifications']}",
        "applicant_emails": emails_to_applicants,
        "eml_written": _eml_count(run) - eml_before,
    }


# --------------------------------------------------------------------------- (c) PostgreSQL


def _probe(port: int, path: str, headers: dict | None = None) -> dict:
    t0 = time.perf_counter()
    try:
        status, response_headers, body = http_get(port, path, headers, timeout=15)
    except (OSError, http.client.HTTPException) as exc:
        return {"path": path[:40], "status": 0, "error": type(exc).__name__}
    text = body[:4000].decode("utf-8", "replace")
    return {
        "path": path[:40],
        "status": status,
        "content_type": response_headers.get("Content-Type", ""),
        "traceback_in_body": "Traceback" in text,
        "retry_after": response_headers.get("Retry-After"),
        "ms": round((time.perf_counter() - t0) * 1000),
        "body": " ".join(text.split())[:120],
    }


def postgres_down(run) -> dict:
    stack = run.stack
    server = stack.start_gunicorn(stack.env())
    token = run.data["links"][2]["token"]
    api_token = run.data["links"][2]["api_token"]
    paths = [
        ("/_prove/trivial/", None),
        (f"/d/{token}/", None),
        (f"/d/{token}/7B/params.json", None),
        ("/api/releases/", {"Authorization": f"Token {api_token}"}),
        ("/", None),
        ("/healthz", None),
        ("/readyz", None),
    ]
    try:
        pid = server.proc.pid
        before = [_probe(server.port, p, h) for p, h in paths]
        stack.stop_postgres()
        down_at = time.monotonic()
        samples: list[dict] = []
        while time.monotonic() - down_at < 3 and len(samples) < 200:  # a 3 s outage
            samples += [_probe(server.port, p, h) for p, h in paths]
        outage_s = time.monotonic() - down_at
        during = []  # one sample per path and status, with how often it was seen
        for sample in samples:
            seen = next(
                (
                    d
                    for d in during
                    if (d["path"], d["status"]) == (sample["path"], sample["status"])
                ),
                None,
            )
            if seen is None:
                during.append({**sample, "count": 1})
            else:
                seen["count"] += 1
        stack.start_postgres()
        up_at = time.monotonic()
        recovered = wait_for(
            lambda: all(_probe(server.port, p, h)["status"] == 200 for p, h in paths[1:4]),
            30,
            step=0.5,
        )
        recovery_s = time.monotonic() - up_at
        after = [_probe(server.port, p, h) for p, h in paths]
        same_process = server.alive() and server.proc.pid == pid
    finally:
        server.stop()
    db_paths = {p[:40] for p, _ in paths[1:5]}
    db_during = [d for d in during if d["path"] in db_paths]
    clean = all(d["status"] == 503 and not d["traceback_in_body"] for d in db_during)
    return {
        "status": "ok" if clean and recovered and same_process else "failed",
        "before": [{k: b[k] for k in ("path", "status")} for b in before],
        "during_outage": during,
        "outage_s": round(outage_s, 1),
        "all_db_pages_clean_503": clean,
        "recovered_without_restart": bool(recovered and same_process),
        "recovery_s": round(recovery_s, 1),
        "after": [{k: a[k] for k in ("path", "status")} for a in after],
    }


# --------------------------------------------------------------------------- (d) S3 (moto)


def _s3_env(run, moto_port: int) -> dict:
    return s3_env(run.stack, moto_port)


def s3_down(run) -> dict:
    stack = run.stack
    try:
        moto = stack.start_moto()
    except StackError as exc:
        return {"status": f"not run: {exc}"}
    env = _s3_env(run, moto.port)
    stack.internal("create_bucket", env=env, bucket=BUCKET)
    small = stack.root / "s3-small"
    big = stack.root / "s3-big"
    for directory, shards, mb in ((small, 1, 2), (big, 4, 24)):
        stack.sample_release(directory, shards=shards, shard_mb=mb, env=env, seed=5)
    published = stack.manage(
        "publish_release", str(small), "--slug", "llama-13b", "-v", "0", env=env
    )
    if published.returncode:
        raise RuntimeError(f"publish with S3 up failed: {published.stderr[-500:]}")
    link = stack.internal(
        "granted_links", env=env, prefix="s3user", count=1, slug="llama-13b", budget_copies=5
    )["links"][0]
    server = stack.start_gunicorn(env)
    try:
        up_status = http_get(server.port, f"/d/{link['token']}/7B/params.json")[0]
        charged_up = stack.internal("link_usage", env=env, token=link["token"])["bytes_charged"]
        stack.stop_moto()
        # (1) publish with S3 down from the start
        t0 = time.perf_counter()
        down_publish = stack.manage(
            "publish_release", str(small), "--slug", "prove-s3-down", env=env, timeout=180
        )
        publish_s = time.perf_counter() - t0
        rows_down = stack.internal("release_rows", env=env, slug="prove-s3-down")
        # (2) download with S3 down
        status, headers, body = http_get(
            server.port, f"/d/{link['token']}/7B/consolidated.00.pth", {"Range": "bytes=0-1023"}
        )
        followed = None
        if status in (301, 302, 303, 307) and headers.get("Location"):
            from urllib.parse import urlsplit

            location = urlsplit(headers["Location"])
            try:
                conn = http.client.HTTPConnection(location.hostname, location.port, timeout=5)
                conn.request(
                    "GET", location.path + "?" + location.query, headers={"Range": "bytes=0-1023"}
                )
                followed = f"HTTP {conn.getresponse().status}"
            except OSError as exc:
                followed = f"{type(exc).__name__}: {exc}"
        usage = stack.internal("link_usage", env=env, token=link["token"])
    finally:
        server.stop()
    # (3) S3 dies in the middle of a publish: after the first object is stored
    mid = {"status": "not run"}
    with contextlib.suppress(StackError):
        moto = stack.start_moto()
        stack.internal("create_bucket", env=env, bucket=BUCKET)
        proc = subprocess.Popen(  # noqa: S603
            [
                sys.executable,
                str(REPO / "manage.py"),
                "publish_release",
                str(big),
                "--slug",
                "prove-s3-mid",
                "-v",
                "0",
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        landed = wait_for(lambda: moto.tail(400).count(f"PUT /{BUCKET}/sha256") >= 1, 90, step=0.05)
        stack.stop_moto()
        try:
            out, err = proc.communicate(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        mid = {
            "killed_after_first_object": landed,
            "exit_code": proc.returncode,
            "error": (err.strip().splitlines() or [""])[-1][:300],
            "rows": stack.internal("release_rows", env=env, slug="prove-s3-mid"),
        }
    publish_clean = down_publish.returncode != 0 and (
        "CommandError" in down_publish.stderr or "unreachable" in down_publish.stderr
    )
    no_rows = rows_down == {"releases": 0, "artifacts": 0}
    mid_ok = mid.get("exit_code", 1) != 0 and mid.get("rows", {}).get("artifacts", 0) == 0
    charged_delta = usage["bytes_charged"] - charged_up
    download_clean = status >= 500 and charged_delta == 0
    return {
        "status": "ok" if publish_clean and no_rows and mid_ok and download_clean else "failed",
        "download_with_s3_up": up_status,
        "publish_with_s3_down": {
            "exit_code": down_publish.returncode,
            "seconds": round(publish_s, 1),
            "error": (down_publish.stderr.strip().splitlines() or [""])[-1][:300],
            "rows": rows_down,
        },
        "publish_s3_killed_midway": mid,
        "download_with_s3_down": {
            "status": status,
            "location_host": headers.get("Location", "")[:40],
            "client_following_redirect": followed,
            "bytes_charged_to_link": charged_delta,
            "events": usage["events"][-2:],
        },
    }


SCENARIOS = [
    ("fault_kill_worker", kill_worker, 150),
    ("fault_redis_down", redis_down, 90),
    ("fault_postgres_down", postgres_down, 60),
    ("fault_s3_down", s3_down, 90),
]
