# CPU image for `mmfusion serve`. Not built or tested in this repository's CI (no Docker engine there).
#   docker build -t mmfusion-serve .
#   docker run --rm -p 8000:8000 -e MMFUSION_API_KEY=... -v $PWD/runs/quickstart:/model:ro mmfusion-serve /model
# The server binds 0.0.0.0 (see ENTRYPOINT), so it refuses to start (exit 2) without an API key: pass one as
# MMFUSION_API_KEY (clients send it as x-api-key or Authorization: Bearer; /healthz stays open), or append
# --insecure to the run command to serve without one. Never bake a key into the image.
FROM python:3.12-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 OMP_NUM_THREADS=1
RUN apt-get update && apt-get install -y --no-install-recommends libsndfile1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /app

# CPU-only torch first, pinned, so `pip install .[serve]` does not pull a CUDA build
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml README.md ./
COPY src ./src
# editable: keeps src/mmfusion/serve/static/ (the demo page) next to the code
RUN pip install -e '.[serve]' && useradd --create-home --uid 10001 mmfusion
USER mmfusion

EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=3s CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz')"
# Inside a container the server must bind 0.0.0.0 to be reachable through -p; the key comes from MMFUSION_API_KEY.
ENTRYPOINT ["mmfusion", "serve", "--host", "0.0.0.0", "--port", "8000"]
CMD ["/model"]
