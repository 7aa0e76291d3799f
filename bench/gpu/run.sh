#!/bin/bash
# The AOT-package runs of bench/gpu/README.md as steps, one step per device-tool call (each fits the 10-minute limit
# and the 64 MiB a call carries). Records go to $OUT as <tag>-<preset>-<date>-*.{json,log}; copy them into
# bench/results/. TAG names the GPU in the file names (default h200), DAY the date (default today's).
#
#   bash bench/gpu/run.sh build sd15|sdxl    carry [.whl] (and .whl-ts to install TorchServe on the way): preset
#                                            weights, packages for the 4 sizes of bench/gpu/<preset>-4sizes.yaml,
#                                            their checks, a fresh start and per-size latency; the packages packed
#                                            into $OUT/aot-<preset>.tar.xz.NN for another machine
#   bash bench/gpu/run.sh reuse sd15 [sdxl]  carry [.whl, .aot-carry] on another machine: unpack the packages beside
#                                            new preset weights; the same record, which must list every size under
#                                            aot_reused
#   bash bench/gpu/run.sh ts                 carry [.whl-ts]: install TorchServe (no .whl needed once installed)
#   bash bench/gpu/run.sh serve sd15 [sdxl]  carry [.whl-jre]: the real TorchServe from the packages, empty JIT
#                                            caches: start to READY, then the load test (serve_bench --phases cold);
#                                            SERVE_ARGS are added to serve_bench's (e.g. --no-compile, with
#                                            SUFFIX=eager to name the log); a later call on the machine needs no carry
TAG=${TAG:-h200}
DAY=${DAY:-$(date +%F)}
step=$1
shift
if [ -d .whl ]; then
  source bench/gpu/setup.sh || exit 1  # its version probe fails without a deepspeed wheel: pipefail only after it
else  # a later call on the same machine: the wheels are in /tmp/site already
  export PYTHONPATH=/tmp/site:$PWD/handler:$PWD/scripts PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
set -o pipefail
if [ -d .whl-ts ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade .whl-ts/*.whl && echo "TorchServe installed"
fi
quiet() { grep -v "it/s\]" | tail -"$1"; }  # the progress bars' lines stay in the logs only

weights() {
  python3 -c "from gpu_common import preset_weights; preset_weights('$1')" 2>&1 | tail -1
}

case $step in
  build)
    for p in "$@"; do
      limit=$([ "$p" = sdxl ] && echo 540 || echo 480)  # SDXL's build took 306-365 s on H100s, SD 1.5's 212-259 s
      weights "$p"
      timeout $limit python3 scripts/gpu.py precompile /tmp/bench-weights-$p --config bench/gpu/$p-4sizes.yaml --aot \
        --build-timeout $((limit - 110)) --check --time-sizes --preset $p --json $OUT/$TAG-$p-$DAY-aot-4sizes.json \
        2>&1 | tee $OUT/$TAG-$p-$DAY-aot-4sizes.log | quiet 40
      echo "precompile rc $?"
      tar -C /tmp/bench-weights-$p/compile-artifacts -cf - aot | xz -1 -T0 | split -b 15M -d - $OUT/aot-$p.tar.xz.
    done
    ;;
  reuse)
    for p in "$@"; do
      weights "$p"
      mkdir -p /tmp/bench-weights-$p/compile-artifacts
      xz -dc .aot-carry/aot-$p.tar.xz | tar -C /tmp/bench-weights-$p/compile-artifacts -xf - || exit 1
      timeout 240 python3 scripts/gpu.py precompile /tmp/bench-weights-$p --config bench/gpu/$p-4sizes.yaml --aot \
        --check --time-sizes --preset $p --json $OUT/$TAG-$p-$DAY-aot-4sizes-fresh-machine.json \
        2>&1 | tee $OUT/$TAG-$p-$DAY-aot-4sizes-fresh-machine.log | quiet 25
      echo "precompile rc $?"
    done
    ;;
  ts) ;;
  serve)
    [ -d /tmp/jre17 ] || tar -C /tmp -xJf .whl-jre/jre17.tar.xz || exit 1
    export JAVA_HOME=/tmp/jre17 PATH=/tmp/jre17/bin:$PATH
    for p in "$@"; do
      clients=$([ "$p" = sdxl ] && echo "1 4" || echo "1 8")  # SDXL's config batches 1, SD 1.5's 8
      log=$OUT/$TAG-$p-$DAY-serving-${SUFFIX:-aot}.log
      weights "$p"  # already there after `build`; made here for a run without packages (SERVE_ARGS=--no-compile)
      timeout 280 python3 scripts/gpu.py serve-bench --out $OUT/serving-$p --work /tmp/serve-$p --preset $p \
        --phases cold --weights /tmp/bench-weights-$p --config bench/gpu/$p-4sizes.yaml --concurrency $clients \
        $SERVE_ARGS > $log 2>&1
      echo "serve-bench rc $?"
      quiet 30 < $log
      pkill -x java  # a frontend left by a cut run would hold the ports
    done
    ;;
  *)
    echo "usage: bash bench/gpu/run.sh build|reuse|ts|serve PRESET..." >&2
    exit 2
    ;;
esac
