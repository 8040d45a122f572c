# The prebuilt image for `lora-pipeline compile --image IMAGE --package-spec ''` (docs/kubeflow.md).
# Same base as the compiled pipeline's default image: Python 3.11 with CUDA torch.
FROM pytorch/pytorch:2.7.1-cuda12.6-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

RUN useradd --create-home --uid 1000 lora

WORKDIR /opt/lora-pipeline
# Only what the build needs (.dockerignore too): no .git, runs, configs or credentials from the context.
COPY pyproject.toml README.md ./
COPY src ./src
# torch>=2.4 is already met by the image's CUDA build, so pip keeps it and adds only the pure-Python rest.
RUN pip install --no-cache-dir "./[kubeflow]"

USER 1000
WORKDIR /home/lora
