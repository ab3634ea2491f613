# syntax=docker/dockerfile:1
# The image conf/k8s/ runs: Ray's own image (same Ray and Python as tessera is tested with) with tessera
# installed from this checkout, the viewer's npm assets built in. Two variants:
#
#   docker build --build-arg VARIANT=cpu  -t registry.example.org/tessera:0.1.0-cpu  .
#   docker build --build-arg VARIANT=cuda -t registry.example.org/tessera:0.1.0-cuda .
#   docker push registry.example.org/tessera:0.1.0-cuda     # your registry; conf/k8s/ names this one
#
# cpu: PyTorch's CPU wheels (no CUDA libraries, a smaller image); cuda: PyPI's PyTorch, which brings
# its own CUDA runtime (the nodes need an NVIDIA driver and the device plugin). docs/cluster.md.
ARG RAY_VERSION=2.60.0
ARG PYTHON=py311
ARG VARIANT=cpu

# The viewer's front-end packages, pinned by its package-lock.json.
FROM node:22-slim AS viewer
WORKDIR /viewer
COPY pipeline/service/viewer/package.json pipeline/service/viewer/package-lock.json ./
RUN npm ci --no-audit --no-fund --loglevel=error --ignore-scripts

FROM rayproject/ray:${RAY_VERSION}-${PYTHON}-cpu AS ray-cpu
ENV TORCH_INDEX=https://download.pytorch.org/whl/cpu

FROM rayproject/ray:${RAY_VERSION}-${PYTHON}-gpu AS ray-cuda
ENV TORCH_INDEX=https://pypi.org/simple

FROM ray-${VARIANT}
# A C++ compiler for pydensecrf2 (`tessera refine`), which PyPI has as source only.
USER root
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
USER ray
COPY --chown=ray . /tmp/tessera
COPY --from=viewer --chown=ray /viewer/node_modules /tmp/tessera/pipeline/service/viewer/node_modules
RUN pip install --no-cache-dir torch --index-url "$TORCH_INDEX" \
    && pip install --no-cache-dir "/tmp/tessera[crf]" \
    && rm -rf /tmp/tessera \
    && tessera --help > /dev/null && python -m jobs.segment --help > /dev/null
WORKDIR /home/ray
