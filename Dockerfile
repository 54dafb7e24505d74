# flux-lora on a CUDA box: sd-scripts at the pinned commit in its own venv, flux-lora beside it.
#   docker build -t flux-lora .
#   docker run --gpus all -v /path/to/models:/models -v /path/to/data:/data -v $PWD/outputs:/outputs \
#       flux-lora python launch.py profile=final gpu=h100
# The same file builds on a CPU-only host that reaches only package registries (Debian base, CPU torch
# from a local wheel folder, no sd-scripts): scripts/build_image.sh shows the build arguments for that.
ARG BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE}

# A git URL or anything `git clone` takes (e.g. a checkout bound in with `podman build -v`);
# "none" leaves sd-scripts out (native engine only) where GitHub cannot be reached.
ARG SD_SCRIPTS=https://github.com/kohya-ss/sd-scripts
ARG SD_SCRIPTS_COMMIT=48d368fa557731ad0488c07304dfeba8c07910eb
# 2.13.0 from the cu128 index is 2.13.0+cu128; a CPU host passes 2.13.0+cpu so pip cannot pick a CUDA build.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
# pip's own settings for every pip in the build, empty (ignored by pip) by default, not kept in the image:
# a folder of wheels searched beside the indexes (how a host without the PyTorch index supplies torch) and
# a CA bundle (for a proxy with its own CA); both are paths inside the build, e.g. bound with `podman build -v`.
ARG PIP_FIND_LINKS=
ARG PIP_CERT=
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1

RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates git python3 python3-venv \
        libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

# sd-scripts pins its own (older) diffusers/transformers, so it gets a venv of its own.
RUN if [ "${SD_SCRIPTS}" = none ]; then echo "SD_SCRIPTS=none: image without sd-scripts (native engine only)"; \
    else git clone "${SD_SCRIPTS}" /opt/sd-scripts \
        && git -C /opt/sd-scripts checkout "${SD_SCRIPTS_COMMIT}" \
        && python3 -m venv /opt/sd-scripts/.venv \
        && /opt/sd-scripts/.venv/bin/pip install torch torchvision --index-url "${TORCH_INDEX}" \
        && cd /opt/sd-scripts && .venv/bin/pip install -r requirements.txt; \
    fi
ENV SD_SCRIPTS_DIR=/opt/sd-scripts

WORKDIR /opt/flux-lora
# Dependencies from pyproject.toml alone (built as an empty package that carries only the requirements),
# so a source change reuses this ~2 GB layer; torch first, from its own index: a bare `torch` requirement
# from PyPI pulls a CUDA build of several GB.
COPY pyproject.toml .
RUN python3 -m venv .venv \
    && .venv/bin/pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
    && .venv/bin/pip install . && rm -rf build ./*.egg-info
COPY . .
RUN .venv/bin/pip install --no-deps -e .
ENV PATH=/opt/flux-lora/.venv/bin:$PATH

# Smoke test of the image: the embedded default (tiny model, sample dataset, CPU, native engine) composes,
# passes its checks and freezes a run, no training. It runs before conf/local exists, since the per-machine
# config below points at /models and /data, which only exist at `docker run`.
RUN python launch.py launch.dry_run=true paths.outputs=/tmp/dry-run \
    && cat /tmp/dry-run/runs/*/command.json && rm -rf /tmp/dry-run

RUN mkdir -p conf/local && cp examples/local/default.yaml conf/local/default.yaml

VOLUME ["/models", "/data", "/outputs"]
CMD ["python", "launch.py"]
