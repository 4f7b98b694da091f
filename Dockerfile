# odeforge image: API and workers share it (`odeforge api` / `odeforge worker`).
# TORCH_INDEX_URL picks the torch build: CPU wheels for the API, CUDA wheels for GPU workers.
FROM python:3.11-slim
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
RUN pip install "torch==2.13.0" --index-url "${TORCH_INDEX_URL}"
COPY pyproject.toml README.md ./
COPY odeforge ./odeforge
COPY node_engine ./node_engine
COPY jobs ./jobs
COPY service ./service
COPY worker ./worker
RUN pip install .
RUN useradd --create-home odeforge && mkdir -p /data/artifacts && chown -R odeforge /data
USER odeforge
EXPOSE 8000
CMD ["odeforge", "api", "--host", "0.0.0.0", "--port", "8000"]
