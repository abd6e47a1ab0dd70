# rcekd: one image for the API (default CMD) and the Celery workers (docker-compose.yml overrides CMD).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OMP_NUM_THREADS=1

WORKDIR /srv/rcekd

# torch first, from the CPU index: the project's range accepts this build, so `pip install .`
# keeps it instead of pulling a multi-GB CUDA build. Its own layer: it changes least often.
RUN pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu

COPY pyproject.toml README.md ./
COPY rcekd ./rcekd
COPY app ./app
COPY worker ./worker
RUN pip install . \
    && rm -rf build *.egg-info

# never run as root; /data is the artifacts volume (a named volume inherits this ownership)
RUN useradd --create-home --uid 10001 --user-group rcekd \
    && mkdir -p /data \
    && chown rcekd:rcekd /data
USER rcekd
# numba caches its compiled KD kernels beside the package, which this user cannot write: use /tmp
ENV RCEKD_HOME=/data \
    NUMBA_CACHE_DIR=/tmp/numba-cache

EXPOSE 8000
CMD ["uvicorn", "app.main:app", "--host", "0.0.0.0", "--port", "8000"]
