# The Mesh image: workers, beat, Flower and the `mesh` CLI (docker-compose.yml builds it).
#   docker build -t mesh .
#   docker run --rm -e MESH_REDIS_URL=redis://:pw@redis-host:6379/0 mesh mesh worker --name w1
# Optional runtimes (docs/runtimes.md) are extras: docker build --build-arg MESH_EXTRAS=xgboost,lightgbm -t mesh .
FROM python:3.11-slim
ARG MESH_EXTRAS=""

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Install the project from a scratch copy of the sources, so the image holds only the
# installed package (plus scripts/, for the compose init step).
COPY pyproject.toml README.md celeryconfig.py /tmp/src/
COPY mesh /tmp/src/mesh
COPY workers /tmp/src/workers
RUN pip install "/tmp/src${MESH_EXTRAS:+[$MESH_EXTRAS]}" && rm -rf /tmp/src

WORKDIR /app
COPY scripts /app/scripts

# Run as an unprivileged user; the disk cache and beat's schedule live in directories it owns
# (named volumes mounted there inherit the ownership).
RUN useradd --create-home --uid 10001 mesh \
    && mkdir -p /var/cache/mesh /var/lib/mesh \
    && chown mesh:mesh /var/cache/mesh /var/lib/mesh
USER mesh
ENV MESH_DISK_CACHE_DIR=/var/cache/mesh

CMD ["mesh", "--help"]
