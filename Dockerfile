# One image for the API and the GPU worker. The CUDA build of torch comes from PyPI's default index.
FROM python:3.11-slim
WORKDIR /app
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
COPY pyproject.toml README.md ./
COPY domain domain
COPY planner planner
COPY service service
COPY worker worker
COPY ftjobs ftjobs
COPY migrations migrations
# [cuda]: liger-kernel for the GPU worker (memory.liger_kernels); its Triton comes with the CUDA torch.
RUN pip install torch==2.13.0 && pip install ".[cuda]"
ENV FTJOBS_HOME=/var/lib/ftjobs
CMD ["ftjobs", "api", "--host", "0.0.0.0"]
