# syntax=docker/dockerfile:1
# Images for docker-compose.yml: target `app` (web, migrate, workers, beat; the
# default) and target `nginx` (the front, with the collected static files).
#
# torch comes from TORCH_INDEX_URL: the CPU wheels by default (a small image that
# runs anywhere). For GPU hosts docker-compose.yml builds the demo worker with
# PyPI's Linux wheels, which bundle the CUDA runtime; the host needs only the
# NVIDIA driver and the NVIDIA Container Toolkit. A CUDA base image
# (nvidia/cuda:12.x-runtime) is needed only for extensions compiled against CUDA.

ARG PYTHON_IMAGE=python:3.11-slim
ARG NGINX_IMAGE=nginx:1.27-alpine

FROM ${PYTHON_IMAGE} AS base
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PORTAL_UID=10001
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN groupadd --system --gid "${PORTAL_UID}" portal \
    && useradd --system --uid "${PORTAL_UID}" --gid portal --home-dir /app --shell /usr/sbin/nologin portal
WORKDIR /app
# The largest layer first, so that code changes do not download torch again.
RUN pip install --index-url "${TORCH_INDEX_URL}" --extra-index-url https://pypi.org/simple "torch==2.13.0"
COPY pyproject.toml README.md manage.py ./
COPY portal portal
COPY access access
COPY weights weights
COPY inference_demo inference_demo
COPY templates templates
COPY deploy deploy
# Editable: the code runs from /app (templates and the demo model live beside it).
RUN pip install -e . \
    && python manage.py collectstatic --noinput \
    && mkdir -p /app/var/weights /app/var/mail /app/var/download-events \
    && chown -R portal:portal /app/var/weights /app/var/mail /app/var/download-events \
    && chown portal:portal /app/var

FROM ${NGINX_IMAGE} AS nginx
ARG PORTAL_UID=10001
# nginx workers run with the app's uid, so they can read the files the app writes
# to the shared local-weights volume (X-Accel-Redirect downloads).
RUN addgroup -S -g "${PORTAL_UID}" portal \
    && adduser -S -D -H -u "${PORTAL_UID}" -G portal -s /sbin/nologin portal \
    && sed -i 's/^user .*;/user portal;/' /etc/nginx/nginx.conf \
    && chown -R portal:portal /var/cache/nginx \
    && mkdir -p /srv/weights && chown portal:portal /srv/weights
COPY deploy/nginx/default.conf /etc/nginx/conf.d/default.conf
COPY --from=base /app/var/static /srv/static

FROM base AS app
USER portal
EXPOSE 8000
# Health checks are per service in docker-compose.yml (web, workers and beat differ).
CMD ["gunicorn", "-c", "deploy/gunicorn.conf.py"]
