# The KServe front (handler/sd_kserve.py) as a custom KServe predictor image, on a CUDA PyTorch base.
#   docker build -f docker/kserve-front.Dockerfile -t registry.example.com/sd-kserve-front:0.1.0 .
# requirements.txt does not list torch: the base's CUDA build is kept, and deepspeed's sdist is built against it
# (its CUDA ops JIT-build at first use and need nvcc: for `backend: deepspeed` use a -devel base).
ARG BASE=pytorch/pytorch:2.11.0-cuda13.0-cudnn9-runtime
FROM ${BASE}
WORKDIR /app
COPY requirements.txt requirements-kserve.txt ./
RUN pip install --no-cache-dir --no-build-isolation -r requirements.txt -r requirements-kserve.txt
COPY handler/ handler/
COPY config/ config/
ENV PYTHONUNBUFFERED=1 HOME=/tmp
USER 1000
# REST (KServe's default container port) and gRPC.
EXPOSE 8080 8081
ENTRYPOINT ["python", "handler/sd_kserve.py"]
# The model store KServe's storage initializer copies to /mnt/models (see config/kserve/inferenceservice-kserve-front.yaml).
# Inside the pod it listens on every interface: authenticate in the mesh or ingress, or set SD_API_KEY.
CMD ["--model-dir", "/mnt/models/model-store/stable-diffusion", "--host", "0.0.0.0", "--http-port", "8080", "--grpc-port", "8081"]
