# The agentgate image: one image, `controlplane` or `dataplane` chosen by its arguments.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY controlplane controlplane
COPY dataplane dataplane
COPY shared shared
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim
COPY --from=build /install /usr/local
USER 65532:65532
ENTRYPOINT ["agentgate"]
