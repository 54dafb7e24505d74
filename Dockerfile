# flux-lora on a CUDA box: sd-scripts at the pinned commit in its own venv, flux-lora beside it.
#   docker build -t flux-lora .
#   docker run --gpus all -v /path/to/models:/models -v /path/to/data:/data -v $PWD/outputs:/outputs \
#       flux-lora python launch.py profile=final gpu=h100
ARG BASE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04
FROM ${BASE}

ARG SD_SCRIPTS_COMMIT=48d368fa557731ad0488c07304dfeba8c07910eb
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 HF_HUB_OFFLINE=1

RUN apt-get update && apt-get install -y --no-install-recommends git python3 python3-venv libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

# sd-scripts pins its own (older) diffusers/transformers, so it gets a venv of its own.
RUN git clone https://github.com/kohya-ss/sd-scripts /opt/sd-scripts \
    && git -C /opt/sd-scripts checkout ${SD_SCRIPTS_COMMIT} \
    && python3 -m venv /opt/sd-scripts/.venv \
    && /opt/sd-scripts/.venv/bin/pip install torch torchvision --index-url ${TORCH_INDEX} \
    && cd /opt/sd-scripts && .venv/bin/pip install -r requirements.txt
ENV SD_SCRIPTS_DIR=/opt/sd-scripts

WORKDIR /opt/flux-lora
COPY . .
RUN python3 -m venv .venv \
    && .venv/bin/pip install torch==2.13.0 --index-url ${TORCH_INDEX} \
    && .venv/bin/pip install -e . \
    && mkdir -p conf/local && cp examples/local/default.yaml conf/local/default.yaml
ENV PATH=/opt/flux-lora/.venv/bin:$PATH

VOLUME ["/models", "/data", "/outputs"]
CMD ["python", "launch.py"]
