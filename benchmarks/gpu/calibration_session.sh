#!/usr/bin/env bash
# On a GPU machine, from the repo root: GPU tests, calibration of every local
# GPU (all at once, twice for run-to-run spread), emulated slower GPUs (green contexts),
# and, when vLLM is importable, the kernel benchmark against vLLM's fused_moe.
#   usage: RESULTS_DIR=dir bash benchmarks/gpu/calibration_session.sh [stage...]   stages: tests calib slow kernels
#          speed (a recalibration's GPU speed check against a quick re-profile: cost, ratios)
#          recorder (GEM's routing recorder per engine step, GPU and host time; STEP_MS: a measured
#          TPOT, default 4.2 ms = GEM's TPOT p50 in ab-slow20 on 2xH200)
#          fp8tests (the fp8 kernel's GPU tests), fp8calib (calibrate --dtype fp8-block, fp8, fp8-channel and bf16,
#          twice each: seconds and held-out error), fp8kernels (the fp8 kernel against vLLM's, each
#          scale layout; needs vLLM)
#          replay (the measured replay's GPU tests, then benchmarks/replay.py: GEM against vLLM's policy
#          on real kernels, ranks as green-context partitions of one GPU; REPLAY_DEADLINE s, REPLAY_ARGS)
#   env: SEARCH=0 times the tile table only (kernels), not every tile of the search;
#        STAGES=1 also times each launch alone (kernels --stages)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
dest=${RESULTS_DIR:?set RESULTS_DIR to the folder for the results}
res=$dest/gem-results; mkdir -p "$res"  # written as it goes: a run cut short keeps what it measured
stages=${*:-tests calib slow kernels}
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$res/install.log" 2>&1 || { echo "install failed"; tail "$res/install.log"; exit 1; }
nvidia-smi --query-gpu=index,name,uuid,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu --format=csv | tee "$res/gpus.csv"
ngpu=$(nvidia-smi -L | wc -l)
tag=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-')x$ngpu
for s in $stages; do case $s in
tests)
  python3 -m pytest -q -m gpu tests/test_kernels.py 2>&1 | tail -4 | tee "$res/gpu-tests-$tag.log" ;;
calib)
  for run in 1 2; do
    python3 -m vllm_gem.cli calibrate --out-dir "$res/profiles-$tag-run$run" --json > "$res/calib-$tag-run$run.json" 2> "$res/calib-$tag-run$run.err" \
      || { echo "calibration run $run failed:"; tail -5 "$res/calib-$tag-run$run.err"; }
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(f'run $run: {d[\"seconds\"]:.1f} s'); [print(' ', r['device'], r['gpu'], 'in worker %.1f s'%r['device_seconds'], 'vs first %.4f'%r['median_time_vs_first'], 'fit %.3f held-out %.3f max %.3f'%(r['fit_rel_rms'], r['held_out_rel_rms'], r['held_out_rel_max'])) for r in d['profiles']]" "$res/calib-$tag-run$run.json"
  done ;;
slow)
  last=$((ngpu - 1))
  for sms in 120 106 92 66; do
    python3 -m vllm_gem.cli calibrate --slow-sms "$last:$sms" --out-dir "$res/profiles-$tag-slow" --json > "$res/calib-$tag-sm$sms.json" 2> "$res/calib-$tag-sm$sms.err" \
      || { echo "slow $sms failed:"; tail -5 "$res/calib-$tag-sm$sms.err"; }
    mkdir -p "$res/profiles-$tag-sm$sms" && mv "$res/profiles-$tag-slow/"*sm$sms* "$res/profiles-$tag-sm$sms/" 2>/dev/null
  done
  python3 benchmarks/gpu/summarize_calibration.py "$res" | tee "$res/calibration-summary-$tag.txt" ;;
speed)
  python3 benchmarks/studies/speed_check.py --json "$res/speed-check-$tag.json" 2>&1 | tee "$res/speed-check-$tag.txt" ;;
recorder)
  python3 benchmarks/recorder_overhead.py --step-ms "${STEP_MS:-4.2}" --json "$res/recorder-$tag.json" | tee "$res/recorder-$tag.txt" ;;
fp8tests)
  python3 -m pytest -q -m gpu tests/test_fp8.py tests/test_kernels.py 2>&1 | tail -15 | tee "$res/fp8-tests-$tag.log" ;;
fp8calib)
  for dtype in fp8-block fp8 fp8-channel bf16; do for run in 1 2; do
    python3 -m vllm_gem.cli calibrate --dtype $dtype --out-dir "$res/profiles-$tag-$dtype-run$run" --json > "$res/calib-$tag-$dtype-run$run.json" 2> "$res/calib-$tag-$dtype-run$run.err" \
      || { echo "calibration $dtype run $run failed:"; tail -5 "$res/calib-$tag-$dtype-run$run.err"; }
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(f'$dtype run $run: {d[\"seconds\"]:.1f} s'); [print(' ', r['device'], r['gpu'], 'in worker %.1f s'%r['device_seconds'], 'fit %.3f held-out %.3f max %.3f'%(r['fit_rel_rms'], r['held_out_rel_rms'], r['held_out_rel_max'])) for r in d['profiles']]" "$res/calib-$tag-$dtype-run$run.json"
  done; done ;;
fp8kernels)
  for dtype in ${FP8_DTYPES:-fp8-block fp8 fp8-channel}; do
    python3 benchmarks/kernels.py --dtype $dtype $([ "${SEARCH:-1}" = 0 ] || echo --search) --json "$res/kernels-$dtype-$tag.json" 2> "$res/kernels-$dtype-$tag.err" | tee "$res/kernels-$dtype-$tag.txt"
    tail -3 "$res/kernels-$dtype-$tag.err"
  done ;;
replay)
  timeout 120 python3 -m pytest -q -m gpu tests/test_replay.py 2>&1 | tail -8 | tee "$res/replay-tests-$tag.log"
  timeout $(( ${REPLAY_DEADLINE:-360} + 150 )) python3 benchmarks/replay.py --json "$res/replay-$tag.json" \
    --deadline "${REPLAY_DEADLINE:-360}" ${REPLAY_ARGS:-} 2> "$res/replay-$tag.err" | tee "$res/replay-$tag.txt"
  tail -5 "$res/replay-$tag.err" ;;
kernels)
  python3 benchmarks/kernels.py $([ "${SEARCH:-1}" = 0 ] || echo --search) $([ "${STAGES:-0}" = 1 ] && echo --stages) --json "$res/kernels-$tag.json" 2> "$res/kernels-$tag.err" | tee "$res/kernels-$tag.txt" ;;
esac; done
bash benchmarks/gpu/pack.sh "$dest" calibration
