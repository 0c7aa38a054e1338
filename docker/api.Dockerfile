# The HTTP API: slim Python and the CPU build of torch (serving a folded net needs no GPU).
#   docker compose build api         (context: the repository root)
FROM python:3.12-slim

ARG TORCH_VERSION=2.13.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The CPU wheel first: an unpinned torch from PyPI would pull a multi-GB CUDA build.
RUN pip install "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cpu

WORKDIR /app
COPY pyproject.toml README.md ./
COPY normprop ./normprop
COPY service ./service
# uvicorn[standard] brings uvloop and httptools: about twice h11's requests/s.
RUN pip install ".[service]" orjson

RUN useradd --system --uid 10001 --home-dir /app normprop \
    && mkdir -p /data && chown normprop /data
USER normprop

ENV NP_DATA_DIR=/data \
    NP_API_HOST=0.0.0.0 \
    NP_API_PORT=8000
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"]

CMD ["python", "-m", "service", "api"]
