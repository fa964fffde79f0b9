# Image of the sec-online command line: `docker run sec-online worker`, `... demo`, `... replay`.
# compose.yaml builds it and points it at the Kafka service.
FROM python:3.11-slim

# The CPU build of torch (the +cpu wheels) leaves out the CUDA libraries, several GB that a
# CPU-only worker never loads. Build with --build-arg TORCH_INDEX_URL= to use PyPI's wheel.
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN useradd --create-home --uid 1000 sec \
    && mkdir -p /var/lib/sec-online \
    && chown sec:sec /var/lib/sec-online

WORKDIR /app
# Only what the package build needs: the virtual environment, caches and data stay outside.
COPY pyproject.toml constraints.txt README.md ./
COPY sec_online ./sec_online
COPY streams ./streams
COPY state ./state
RUN pip install ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} -c constraints.txt .

USER sec
ENV SEC_WORK_DIR=/var/lib/sec-online/work \
    SEC_REPORTS_DIR=/var/lib/sec-online/reports \
    SEC_CACHE_DIR=/var/lib/sec-online/cache
VOLUME ["/var/lib/sec-online"]
EXPOSE 6066

ENTRYPOINT ["sec-online"]
CMD ["worker"]
