# The agentgate image: one image, `controlplane` or `dataplane` chosen by its arguments.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY controlplane controlplane
COPY dataplane dataplane
COPY shared shared
# opentelemetry-proto is reinstalled last: xds-protos ships an older copy of its modules (see Makefile).
RUN pip install --no-cache-dir --prefix=/install . \
 && export PYTHONPATH=/install/lib/python3.11/site-packages \
 && pip install --no-cache-dir --prefix=/install --force-reinstall --no-deps \
      "opentelemetry-proto==$(python -c 'from importlib.metadata import version; print(version("opentelemetry-proto"))')"

FROM python:3.11-slim
COPY --from=build /install /usr/local
USER 65532:65532
ENTRYPOINT ["agentgate"]
