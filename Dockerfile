# One image for the controller, the HTTP bridge and the simulated agents;
# compose.yaml picks the process with `python -m controller|bridge_http|agent_sim`.
FROM python:3.11.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, so a code change does not reinstall them. The version
# list is read from pyproject.toml, where every one is pinned.
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

COPY schemas ./schemas
COPY controller ./controller
COPY bridge_http ./bridge_http
COPY agent_sim ./agent_sim
COPY kbbus ./kbbus
COPY broker_config ./broker_config
RUN pip install --no-deps .

RUN useradd --system --uid 10001 --home-dir /app kbbus \
    && mkdir -p /app/.kbbus \
    && chown kbbus /app/.kbbus
USER kbbus

CMD ["python", "-m", "controller"]
