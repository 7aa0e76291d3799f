#!/bin/bash
# The AOT-package runs of bench/gpu/README.md as steps, one step per device-tool call (each fits the 10-minute limit
# and the 64 MiB a call carries). Records go to $OUT as <tag>-<preset>-<date>-*.{json,log} (serve: the log, and
# serve_bench's serving.json, plot and logs under $OUT/serving-<preset>/); copy them into bench/results/. TAG names
# the GPU in the file names (default: from nvidia-smi, e.g. h100, h200), DAY the date (default today's). The exit
# status is non-zero when any run of the step failed.
#
#   bash bench/gpu/run.sh build sd15|sdxl    carry [.whl] (and .whl-ts to install TorchServe on the way): preset
#                                            weights, packages for the 4 sizes of bench/gpu/<preset>-4sizes.yaml,
#                                            their checks, a fresh start and per-size latency; the packages packed
#                                            into $OUT/aot-<preset>.tar.xz.NN for another machine
#   bash bench/gpu/run.sh reuse sd15 [sdxl]  carry [.whl, .aot-carry] on another machine: unpack the packages beside
#                                            new preset weights; the same record, which must list every size under
#                                            aot_reused
#   bash bench/gpu/run.sh ts                 carry [.whl-ts]: install TorchServe (no .whl needed once installed)
#   bash bench/gpu/run.sh imports            what a worker's imports take with and without the carried packages'
#                                            bytecode (setup.sh compiles it), with the collector paused, and without
#                                            peft; the slowest modules, into $OUT/<tag>-<date>-import-time.txt
#   bash bench/gpu/run.sh kernels            SDXL's attention backends and FP8 against float16 matmuls at its
#                                            transformer layers' shapes, into $OUT/<tag>-sdxl-<date>-kernels.json
#   bash bench/gpu/run.sh decoder            carry [.whl]: SDXL's float32 VAE decoder packaged as the engine did,
#                                            with Inductor's own attention (math), without stride padding and for
#                                            batch 1 alone; the first two under compute-sanitizer's memcheck, then
#                                            each checked in fresh processes (decoder_fault.py)
#   bash bench/gpu/run.sh decoder-jit        carry [.whl]: SDXL's float32 VAE decoder under torch.compile with the
#                                            batch, height and width dynamic: cold, then from its cache artifacts in a
#                                            fresh process; per size against uncompiled, under CUDA graphs
#                                            (decoder_jit.py), into $OUT/<tag>-sdxl-<date>-decoder-jit.{json,log}
#   bash bench/gpu/run.sh overlap            the weights' sha256 check beside the diffusers import, as a worker's
#                                            start does it, against each alone and two other ways to check
#                                            (bench/gpu/overlap.py), into $OUT/<tag>-<date>-overlap.txt
#   bash bench/gpu/run.sh attention          which attention kernel the UNet packages should call: each backend's
#                                            ms per step, and its first calls at a start's shapes in fresh processes
#                                            (empty, then kept driver cache), into $OUT/<tag>-<date>-attention.txt
#   bash bench/gpu/run.sh profile sd15 [sdxl] carry [.whl] (py-spy's wheel), after build or reuse on the machine: a
#                                            fresh start from the packages under py-spy, the raw samples and their
#                                            summary (bench/gpu/profile_summary.py) into $OUT/<tag>-<p>-<date>-start-profile.*
#   bash bench/gpu/run.sh jitcache sd15      after build or reuse on the machine: fresh starts alternating a kept and
#                                            an empty CUDA driver JIT cache (compile_artifacts.py --driver-cache: no
#                                            shipped cache seeds it): what the driver's cache saves a start
#   bash bench/gpu/run.sh handler sd15       after build or reuse (carry .whl-ts once): an in-process start and the
#                                            TorchServe handler's start in this process (bench/gpu/handler_start.py)
#                                            from the shipped driver cache, then a batch of 3 (which the warm-up
#                                            skips) after READY, with generate run from / (as shipped) and from the
#                                            model's folder as before (--request-cwd-as-is)
#   bash bench/gpu/run.sh serve sd15 [sdxl]  carry [.whl-jre]: the real TorchServe from the packages, empty JIT
#                                            caches: start to READY, then the load test (serve_bench --phases cold);
#                                            SERVE_ARGS are added to serve_bench's (e.g. --no-compile, with
#                                            SUFFIX=eager to name the log); a later call on the machine needs no carry
step=$1
shift
if [ -d .whl ]; then
  source bench/gpu/setup.sh || exit 1  # its version probe fails without a deepspeed wheel: pipefail only after it
else  # a later call on the same machine: the wheels are in /tmp/site already
  export PYTHONPATH=/tmp/site:$PWD/handler:$PWD/scripts PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi
set -o pipefail
TAG=${TAG:-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | grep -o 'H[0-9]*' | head -1 | tr H h)}
TAG=${TAG:-gpu}
DAY=${DAY:-$(date +%F)}
status=0
if [ -d .whl-ts ]; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site --upgrade .whl-ts/*.whl && echo "TorchServe installed" \
    || status=1
fi
quiet() { grep -v "it/s\]" | tail -"$1"; }  # the progress bars' lines stay in the logs only

weights() {  # the preset's random-weight folder, built once per machine
  python3 -c "from gpu_common import preset_weights; print(preset_weights('$1'))"
}
fresh_start() {  # the command of a fresh engine start from the preset's packages (built or reused on this machine),
  # as compile_artifacts.py --check times it; its record on stdout. (Words without spaces: used as $(fresh_start p).)
  local batch
  batch=$(python3 -c "import yaml; print(yaml.safe_load(open('bench/gpu/$1-4sizes.yaml')).get('batchSize', 1))")
  echo python3 scripts/compile_artifacts.py /tmp/bench-weights-$1 --config bench/gpu/$1-4sizes.yaml --aot \
    --batch-size $batch --preset $1 --load-only
}

case $step in
  build)
    for p in "$@"; do
      weights "$p" || exit 1
      # What is left of the call's 10 minutes (BUDGET: less where the call ran something before), less 30 s to pack
      # the packages (SDXL's build took 306-365 s on H100s, SD 1.5's 212-259 s); the build itself stops 110 s before
      # that, to check them and time a fresh start.
      limit=$((${BUDGET:-570} - SECONDS))
      timeout $limit python3 scripts/gpu.py precompile /tmp/bench-weights-$p --config bench/gpu/$p-4sizes.yaml --aot \
        --build-timeout $((limit - 110)) --check --time-sizes --preset $p --json $OUT/$TAG-$p-$DAY-aot-4sizes.json \
        2>&1 | tee $OUT/$TAG-$p-$DAY-aot-4sizes.log | quiet 40
      rc=${PIPESTATUS[0]}
      echo "precompile rc $rc"
      status=$((status | rc))
      if [ -f /tmp/bench-weights-$p/compile-artifacts/aot/index.json ]; then  # what was built, checked or not, the
        # driver's JIT cache the check start filled (jit_caches.py) and torch.compile's artifacts of what the packages
        # leave out (SDXL's float32 VAE decoder: compile_artifacts.compile_unpackaged)
        (cd /tmp/bench-weights-$p/compile-artifacts && tar -cf - $(ls -A)) | xz -1 -T0 \
          | split -b 15M -d - $OUT/aot-$p.tar.xz.
      fi
    done
    ;;
  reuse)
    for p in "$@"; do
      weights "$p" || exit 1
      mkdir -p /tmp/bench-weights-$p/compile-artifacts
      xz -dc .aot-carry/aot-$p.tar.xz | tar -C /tmp/bench-weights-$p/compile-artifacts -xf - || exit 1
      timeout 240 python3 scripts/gpu.py precompile /tmp/bench-weights-$p --config bench/gpu/$p-4sizes.yaml --aot \
        --check --time-sizes --preset $p --json $OUT/$TAG-$p-$DAY-aot-4sizes-fresh-machine.json \
        2>&1 | tee $OUT/$TAG-$p-$DAY-aot-4sizes-fresh-machine.log | quiet 25
      rc=${PIPESTATUS[0]}
      echo "precompile rc $rc"
      status=$((status | rc))
    done
    ;;
  ts) ;;
  imports)
    out=$OUT/$TAG-$DAY-import-time.txt
    imports() {  # a fresh process, as a worker starts: torch, then what load_engine and the handler import
      python3 -c "import gc, time; ${1:-pass}; t = time.time(); import torch; a = time.time() - t; t = time.time()
from diffusers import DiffusionPipeline; import transformers, sd_engine.engine, sd_engine.aot; b = time.time() - t
t = time.time(); gc.collect()  # what a paused start pays at its end; without the pause, timed for comparison
print('import torch %.1f s, then diffusers and the engine %.1f s, then one full collection %.1f s' % (a, b,
      time.time() - t))"
    }
    (
      rc=0
      python3 -c "import os, sys; print('dont_write_bytecode', sys.flags.dont_write_bytecode,
                  {k: v for k, v in os.environ.items() if k.startswith('PYTHON')})"
      find /tmp/site $PWD/handler -name __pycache__ -type d -prune -exec rm -rf {} +
      echo "without the carried packages' bytecode (nothing written meanwhile):"
      for i in 1 2; do PYTHONDONTWRITEBYTECODE=1 imports || rc=1; done
      python3 -m compileall -q -j 0 /tmp/site $PWD/handler > /dev/null
      echo "with it (python3 -m compileall, as pip install does):"
      for i in 1 2; do imports || rc=1; done
      echo "and with Python's garbage collector paused, as the fronts' starts now have it (sd_engine.loading):"
      for i in 1 2; do imports "gc.disable()" || rc=1; done
      echo "and so, with peft unimportable (diffusers imports it for LoRA loading whenever it can):"
      for i in 1 2; do imports "gc.disable(); import sys; sys.modules['peft'] = None" || rc=1; done
      echo "the 20 modules that took longest themselves under -X importtime (self us | cumulative us | module):"
      python3 -X importtime -c "import torch; from diffusers import DiffusionPipeline; import transformers, sd_engine.engine
import sd_engine.aot; from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline" 2>&1 | grep '^import time:' | sort -t'|' -k1.13 -n \
        | tail -20
      python3 -c "import time, torch; t = time.time(); x = torch.ones(8, 320, 64, 64, device='cuda', dtype=torch.half)
a = time.time() - t; t = time.time(); (x.flatten(1)[:, :4096] @ torch.ones(4096, 64, device='cuda', dtype=torch.half)).sum().item()
b = time.time() - t; t = time.time(); torch.nn.functional.conv2d(x, torch.ones(320, 320, 3, 3, device='cuda', dtype=torch.half), padding=1).sum().item()
print('then CUDA init %.1f s, first matmul (cuBLAS) %.1f s, first convolution (cuDNN) %.1f s' % (a, b, time.time() - t))" || rc=1
      exit $rc
    ) 2>&1 | tee $out
    status=$((status | PIPESTATUS[0]))
    ;;
  kernels)  # SDXL's transformer-layer attention backends and FP8 matmuls, timed alone (bench/gpu/kernels.py)
    timeout 120 python3 bench/gpu/kernels.py > $OUT/$TAG-sdxl-$DAY-kernels.json
    rc=$?
    echo "kernels rc $rc"
    python3 -c "import json; print(json.load(open('$OUT/$TAG-sdxl-$DAY-kernels.json'))['totals'])" || status=1
    status=$((status | rc))
    ;;
  decoder)  # why SDXL's float32 VAE decoder packages fault (aot.modules): variants, then compute-sanitizer
    d=/tmp/decoder-fault; rm -rf $d; mkdir -p $d  # (a warm machine's earlier packages must not be checked again)
    out=$OUT/$TAG-sdxl-$DAY-decoder-fault
    variants="efficient math nopad static"
    pids=()
    for v in $variants; do
      timeout 240 python3 bench/gpu/decoder_fault.py build $v $d/$v.pt2 > $d/build-$v.json 2> $d/build-$v.log &
      pids+=($!)
    done
    for pid in "${pids[@]}"; do wait $pid || status=1; done
    for v in $variants; do cat $d/build-$v.json >> $out-build.json; (echo "== $v"; cat $d/build-$v.log) >> $out-build.log; done
    cat $out-build.json
    # compute-sanitizer first (what names the kernel), on the decoder as the engine made it and on the one with no
    # attention kernel of PyTorch's: every tensor its own allocation, so that memcheck sees an access past one (the
    # caching allocator's blocks hide it)
    sanitizer=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
    [ -n "$sanitizer" ] || { echo "no compute-sanitizer on this machine"; status=1; }
    for v in efficient math; do
      [ -n "$sanitizer" ] && [ -f $d/$v.pt2 ] || break
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout 120 "$sanitizer" --tool memcheck --print-limit 20 --error-exitcode 99 \
        python3 bench/gpu/decoder_fault.py check $v $d/$v.pt2 --once > $out-sanitizer-$v.txt 2>&1
      echo "compute-sanitizer memcheck $v: rc $? (99: errors found)"
      grep -v "^========= *$" $out-sanitizer-$v.txt | grep -m 25 "=====\|Error\|ran\|{" || true
    done
    for round in 1 2 3; do
      for v in $variants; do
        [ $((${BUDGET:-570} - SECONDS)) -gt 100 ] || break 2
        [ -f $d/$v.pt2 ] || { status=1; continue; }
        timeout 90 python3 bench/gpu/decoder_fault.py check $v $d/$v.pt2 >> $out.json 2>> $out-check.log
        rc=$?
        echo "round $round $v: rc $rc" | tee -a $out-check.log
      done
    done
    cat $out.json
    ;;
  decoder-jit)  # SDXL's float32 VAE decoder under torch.compile (dynamic batch, height, width) instead of a package:
    # cold (empty caches), then a fresh process from the cold run's portable cache artifacts (bench/gpu/decoder_jit.py)
    out=$OUT/$TAG-sdxl-$DAY-decoder-jit
    rm -f /tmp/decoder-jit-artifacts.bin  # (the warm run must load what this cold one saved)
    for run in cold warm; do
      [ $((${BUDGET:-570} - SECONDS)) -gt 60 ] && [ -f /tmp/decoder-jit-artifacts.bin -o $run = cold ] || break
      c=/tmp/decoder-jit-$run; rm -rf $c; mkdir -p $c
      TORCHINDUCTOR_CACHE_DIR=$c/inductor TRITON_CACHE_DIR=$c/triton timeout $((${BUDGET:-570} - SECONDS)) \
        python3 bench/gpu/decoder_jit.py /tmp/decoder-jit-artifacts.bin $([ $run = warm ] && echo --load) \
        >> $out.json 2>> $out.log
      rc=$?
      echo "decoder-jit $run: rc $rc" | tee -a $out.log
      status=$((status | rc))
    done
    cat $out.json
    ;;
  overlap)  # the weights' check beside the import (bench/gpu/overlap.py): 2.2 GB of files, as SD 1.5's float16 weights
    out=$OUT/$TAG-$DAY-overlap.txt
    # (the manifest is written last: a folder without it is a cut-off make)
    [ -f /tmp/overlap-weights/sd-weights-manifest.json ] || { rm -rf /tmp/overlap-weights
      python3 bench/gpu/overlap.py /tmp/overlap-weights make || exit 1; }
    for round in 1 2; do
      for v in alone thread readinto process; do
        timeout 60 python3 bench/gpu/overlap.py /tmp/overlap-weights $v 2> >(grep -v Warning >&2) | tee -a $out || status=1
      done
    done
    ;;
  attention)  # the UNet packages' attention kernel (bench/gpu/attention_choice.py)
    out=$OUT/$TAG-$DAY-attention.txt
    timeout 120 python3 bench/gpu/attention_choice.py steady | tee -a $out || status=1
    for b in cudnn flash efficient; do
      cache=/tmp/attention-cache-$b; rm -rf $cache
      for run in empty kept; do
        [ $((${BUDGET:-570} - SECONDS)) -gt 130 ] || break 2
        CUDA_CACHE_PATH=$cache timeout 120 python3 bench/gpu/attention_choice.py first $b | sed "s/^/$run driver cache: /" \
          | tee -a $out || status=1
      done
    done
    ;;
  profile)  # where a fresh start from the packages (built or reused on this machine) spends its time
    for p in "$@"; do
      out=$OUT/$TAG-$p-$DAY-start-profile
      # The engine's start as compile_artifacts.py --check times it (load_engine: no sha256 check, so the imports
      # are not overlapped and run with the collector on, unlike a front's). --native: what C++ and CUDA calls wait
      # for. SIGINT on timeout: py-spy then writes what it has and stops its child.
      # Its own folder: a later pip install --target /tmp/site --upgrade (run.sh ts) replaces /tmp/site/bin.
      spy=/tmp/pyspy/bin/py-spy
      [ -x $spy ] || python3 -m pip install -q --no-index --no-deps --target /tmp/pyspy .whl/py_spy-*.whl || exit 1
      timeout -s INT -k 15 200 $spy record --native --idle --rate 50 --format raw -o $out.raw -- $(fresh_start $p) \
        > $out.stdout 2> $out.log
      echo "py-spy rc $?"
      grep -v '^py-spy>' $out.stdout | grep . > $out.json; rm -f $out.stdout  # the start's record, py-spy's lines out
      # py-spy's status is its own, not the start's: the start succeeded when its record came
      python3 -c "import json; print('ready_warm_s', json.loads(open('$out.json').read().splitlines()[-1])['ready_warm_s'])" \
        && python3 bench/gpu/profile_summary.py $out.raw --rate 50 --top 60 --under AOTICompiledModel.__call__ > $out.txt && head -50 $out.txt || status=1
      [ -f $out.raw ] && gzip -f $out.raw
    done
    ;;
  jitcache)  # what the CUDA driver's JIT cache (CUDA_CACHE_PATH) saves a fresh start (drivercache.txt: 4-5 s)
    for p in "$@"; do  # after build or reuse on the machine: starts alternating a kept and an empty driver cache
      for run in kept-1 kept-2 empty-1 kept-3 empty-2; do
        cache=/tmp/cuda-cache-${run%-*}; [ "${run%-*}" = empty ] && rm -rf $cache
        out=$OUT/$TAG-$p-$DAY-jitcache-$run
        timeout 150 $(fresh_start $p) --driver-cache $cache > $out.json 2> $out.log || status=1
        echo "$run: $(du -sh $cache 2>/dev/null | cut -f1) in the driver's cache; $(grep -o '"ready_warm_s": [0-9.]*' \
          $out.json); $(grep -o 'first run in [0-9.]* s' $out.log | head -2 | tr '\n' ' ')"
      done
    done
    ;;
  handler)  # after build or reuse on the machine (carry .whl-ts once): an in-process start, then the TorchServe
    # handler's own start in this process (bench/gpu/handler_start.py: from the model's folder, as a worker), each
    # from a fresh copy of the driver cache the build's check start shipped, then a batch the warm-up skipped (3) after
    # READY: as shipped (generate runs from /) and from the model's folder as before (--request-cwd-as-is), whose
    # first call built kernels the shipped cache missed (a TorchServe worker's took 4.5-5.8 s)
    for p in "$@"; do
      store=/tmp/handler-store-$p; rm -rf $store
      python3 scripts/package_model.py /tmp/bench-weights-$p $store --no-archive --config bench/gpu/$p-4sizes.yaml \
        > /dev/null || exit 1
      out=$OUT/$TAG-$p-$DAY-handler-start
      # Each start with the driver's default cache folder emptied: what it holds afterwards was written by that start.
      rm -rf ~/.nv/ComputeCache
      timeout 150 $(fresh_start $p) > $out-inprocess.json 2> $out-inprocess.log || status=1
      echo "in-process: the driver's default folder holds $(du -sk --apparent-size ~/.nv/ComputeCache 2>/dev/null | cut -f1) kB"
      for run in "" -cwd-as-is; do
        rm -rf ~/.nv/ComputeCache
        timeout 150 python3 bench/gpu/handler_start.py $store/stable-diffusion --then-batch 3 \
          ${run:+--request-cwd-as-is} > $out$run.json 2> $out$run.log || status=1
      done
      for run in $out-inprocess $out $out-cwd-as-is; do
        echo "${run##*/}: $(grep -o '"ready[a-z_]*": [0-9.]*\|"optimize_s": [0-9.]*' $run.json | tr '\n' ' ')$(grep -o \
          'first run in [0-9.]* s' $run.log | head -2 | tr '\n' ' ')$(grep -o '"driver_initialized_at_jit_caches": [a-z]*\|"[a-z_]*cache[a-z_]*kb[a-z_]*": [0-9a-z]*\|"seconds": \[[0-9., ]*\]\|"error": "[^"]*"' \
          $run.json | tr '\n' ' ')"
      done
    done
    ;;
  serve)
    [ -d /tmp/jre17 ] || tar -C /tmp -xJf .whl-jre/jre17.tar.xz || exit 1
    export JAVA_HOME=/tmp/jre17 PATH=/tmp/jre17/bin:$PATH
    for p in "$@"; do
      clients=$([ "$p" = sdxl ] && echo "1 4" || echo "1 8")  # SDXL's config batches 1, SD 1.5's 8
      log=$OUT/$TAG-$p-$DAY-serving-${SUFFIX:-aot}.log
      weights "$p" || exit 1  # already there after `build`; made here for a run without packages
      timeout 280 python3 scripts/gpu.py serve-bench --out $OUT/serving-$p --work /tmp/serve-$p --preset $p \
        --phases cold --weights /tmp/bench-weights-$p --config bench/gpu/$p-4sizes.yaml --concurrency $clients \
        $SERVE_ARGS > $log 2>&1
      rc=$?
      echo "serve-bench rc $rc"
      status=$((status | rc))
      quiet 30 < $log
      pkill -x java || true  # a frontend left by a cut run would hold the ports
    done
    ;;
  *)
    echo "usage: bash bench/gpu/run.sh build|reuse|ts|imports|kernels|decoder|decoder-jit|overlap|attention|profile|jitcache|handler|serve PRESET..." >&2
    exit 2
    ;;
esac
exit $status
