# The one image every Conveyor service runs (docker-compose.yml): `conveyor web`,
# `conveyor worker`, `conveyor beat`, `conveyor flower`, `conveyor db upgrade`.
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, from pyproject.toml alone, so a code change reuses this layer.
COPY pyproject.toml README.md ./
RUN mkdir shared web worker \
    && touch shared/__init__.py web/__init__.py worker/__init__.py \
    && pip install . \
    && pip uninstall -y conveyor \
    && rm -rf shared web worker build

COPY shared ./shared
COPY web ./web
COPY worker ./worker
RUN pip install --no-deps . && rm -rf build

# Never root: the state folder (beat's schedule) belongs to an unprivileged user.
RUN useradd --system --uid 10001 --user-group --no-create-home conveyor \
    && mkdir -p /var/lib/conveyor \
    && chown conveyor:conveyor /var/lib/conveyor
USER conveyor

# Inside a container the servers listen on every interface; compose publishes the ports
# on the host's loopback only.
ENV CONVEYOR_STATE_DIR=/var/lib/conveyor \
    CONVEYOR_WEB_HOST=0.0.0.0 \
    CONVEYOR_FLOWER_HOST=0.0.0.0
EXPOSE 8000 5555

CMD ["conveyor", "web"]
