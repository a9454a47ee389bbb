# The one image every pipeline step runs in: CUDA PyTorch base + dseh and its pinned dependencies.
# Build: docker build -t REGISTRY/dseh:0.1.0 .   (or scripts/build_image.sh with buildah)
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    MPLCONFIGDIR=/tmp/matplotlib

WORKDIR /opt/dseh

# Dependencies first, from the pins alone, so this layer is reused until pyproject.toml or
# constraints.txt change. torch==2.13.0 is already in the base image (its CUDA build).
COPY pyproject.toml constraints.txt README.md ./
RUN mkdir -p dseh components pipelines \
    && touch dseh/__init__.py components/__init__.py pipelines/__init__.py \
    && python -m pip install --no-cache-dir -c constraints.txt . \
    && python -m pip uninstall -y dseh \
    && rm -rf dseh components pipelines

# The code: the library, the Kubeflow components and the pipeline definition.
COPY dseh ./dseh
COPY components ./components
COPY pipelines ./pipelines
RUN python -m pip install --no-cache-dir --no-deps -c constraints.txt . \
    && useradd --create-home --uid 1000 --shell /bin/bash dseh

USER 1000
WORKDIR /home/dseh
ENTRYPOINT []
CMD ["dseh", "--help"]
