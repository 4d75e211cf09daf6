"""The private moto (S3) as the portal sees it: settings, a bucket, a release published into it.

Scenarios that serve from S3 start moto here and stop it when they end, so each one starts
from an empty bucket and the fault scenario that kills moto finds it stopped.
"""

from __future__ import annotations

from pathlib import Path

from prove.stack import Stack, StackError

BUCKET = "prove-weights"


def s3_env(stack: Stack, moto_port: int, **overrides: str) -> dict[str, str]:
    return stack.env(
        WEIGHTS_STORAGE="s3",
        WEIGHTS_S3_BUCKET=BUCKET,
        WEIGHTS_S3_ENDPOINT_URL=f"http://127.0.0.1:{moto_port}",
        WEIGHTS_S3_ACCESS_KEY_ID="prove",
        WEIGHTS_S3_SECRET_ACCESS_KEY="prove-secret",  # noqa: S106 - moto accepts anything
        WEIGHTS_S3_REGION="us-east-1",
        **overrides,
    )


def s3_start(stack: Stack) -> dict[str, str]:
    """Start moto with an empty bucket; the portal's S3 settings for it."""
    moto = stack.start_moto()
    env = s3_env(stack, moto.port)
    stack.internal("create_bucket", env=env, bucket=BUCKET)
    return env


def s3_publish(stack: Stack, env: dict[str, str], directory: Path, slug: str) -> None:
    """`manage.py publish_release` into the bucket. Keys are content-addressed, so the
    objects also serve every release with the same files (the local one in load)."""
    result = stack.manage(
        "publish_release", str(directory), "--slug", slug, "-v", "0", env=env, timeout=300
    )
    if result.returncode:
        raise StackError(f"publish_release {slug} into S3 failed: {result.stderr[-800:]}")
