# Sourced at the start of every device-tool call: install the carried wheels (.whl/: diffusers, deepspeed and the
# packages the GPU image lacks), put the engine and scripts on the path, print the GPU.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || return 1
# Their bytecode, as a normal pip install (a Docker image's) has it: without it every process compiles diffusers'
# sources again where Python may not write its cache (run.sh's `imports` step measures the difference).
python3 -m compileall -q -j 0 /tmp/site > /dev/null || echo "compileall: some files of /tmp/site have no bytecode" >&2
export PYTHONPATH=/tmp/site:$PWD/handler:$PWD/scripts PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, diffusers, deepspeed, transformers; print(torch.__version__, diffusers.__version__, deepspeed.__version__, transformers.__version__)" 2>&1 | tail -1
