# The training worker on a GPU host: a CUDA runtime base and a CUDA build of torch.
#   docker compose build worker      (context: the repository root)
# The device is chosen by NP_DEVICE (auto|cpu|cuda); compose reserves one NVIDIA GPU.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, from the CUDA index: the project's requirement is an open range, and PyPI's
# default build would not match the base image's CUDA.
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY normprop ./normprop
COPY service ./service
RUN pip install ".[service]"

RUN useradd --system --uid 10001 --home-dir /app normprop \
    && mkdir -p /data && chown normprop /data
USER normprop

ENV NP_DATA_DIR=/data \
    NP_DEVICE=cuda \
    NP_WORKER_METRICS_PORT=9100
VOLUME ["/data"]
EXPOSE 9100

# SIGTERM: the worker finishes its step, writes a checkpoint and acks what it covers.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "service", "worker"]
