#!/bin/sh
# One-shot (docker-compose.yml service `minio-bucket`, image minio/mc): the private
# weights bucket, and a MinIO user for the portal whose policy reaches only that
# bucket, so the app never holds MinIO's root credentials. Safe to run again.
set -eu
: "${MINIO_ROOT_USER:?}" "${MINIO_ROOT_PASSWORD:?}" "${WEIGHTS_S3_BUCKET:?}"
: "${WEIGHTS_S3_ACCESS_KEY_ID:?}" "${WEIGHTS_S3_SECRET_ACCESS_KEY:?}"
MINIO_URL="${MINIO_URL:-http://minio:9000}"
POLICY="${TMPDIR:-/tmp}/portal-weights-policy.json"

mc alias set local "$MINIO_URL" "$MINIO_ROOT_USER" "$MINIO_ROOT_PASSWORD" >/dev/null
mc mb --ignore-existing "local/$WEIGHTS_S3_BUCKET"
mc anonymous set none "local/$WEIGHTS_S3_BUCKET"
cat >"$POLICY" <<JSON
{
  "Version": "2012-10-17",
  "Statement": [
    {
      "Effect": "Allow",
      "Action": ["s3:GetBucketLocation", "s3:ListBucket", "s3:ListBucketMultipartUploads"],
      "Resource": ["arn:aws:s3:::$WEIGHTS_S3_BUCKET"]
    },
    {
      "Effect": "Allow",
      "Action": ["s3:GetObject", "s3:PutObject", "s3:DeleteObject",
                 "s3:AbortMultipartUpload", "s3:ListMultipartUploadParts"],
      "Resource": ["arn:aws:s3:::$WEIGHTS_S3_BUCKET/*"]
    }
  ]
}
JSON
mc admin policy create local portal-weights "$POLICY"
mc admin user add local "$WEIGHTS_S3_ACCESS_KEY_ID" "$WEIGHTS_S3_SECRET_ACCESS_KEY"
# Attaching a policy that is already attached is an error; that state is the goal.
mc admin policy attach local portal-weights --user "$WEIGHTS_S3_ACCESS_KEY_ID" \
  || mc admin user info local "$WEIGHTS_S3_ACCESS_KEY_ID" | grep -q portal-weights
echo "bucket $WEIGHTS_S3_BUCKET ready for $WEIGHTS_S3_ACCESS_KEY_ID"
