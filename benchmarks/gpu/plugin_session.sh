#!/usr/bin/env bash
# On a GPU machine, repo root, vLLM overlay on PYTHONPATH: the plugin's checks
# and the serving matrix. Results go to $RESULTS_DIR/gem-results.
#   usage: RESULTS_DIR=dir bash benchmarks/gpu/plugin_session.sh STAGE...
#   stages: setup      install msgspec + this project, make the models and the routing trace
#           identity   greedy outputs with and without GEM (random-weight model, compiled mode)
#           identity-vllm  the control: the same with vLLM's own EPLB policy moving the experts
#           identity-fp32  GEM again, the model served in fp32 (partial MoE sums keep 24 bits)
#           identity-top1  GEM on a top-1 model: one expert per token, so the ranks' partial sums are
#                      that expert's output plus exact zeros and a placement cannot change the rounding;
#                      any difference is a weight or map error (bit-identical outputs expected)
#           identity-switch  greedy outputs across placements inside ONE server (start map, GEM,
#                      vLLM's policy, start map again), for the top-4 and the top-1 model: nothing
#                      but the placement changes between runs
#           equal      serving matrix, equal GPUs: vllm / GEM recorder only / GEM
#           slow20     serving matrix, GPU 1 emulated 20% slower: linear / vLLM EPLB policy / GEM
#           slow10     the same at 10%
#           mix20      slow20 on a Mixtral-like model (8 experts, top-2)
#           ab-slow20  ONE GEM server, GPU 1 20% slower: switch vLLM's start map / vLLM's EPLB policy /
#                      GEM before every benchmark run, BENCH_REPEATS rounds in rotated order
#           ab-slow10, ab-mix20   the same at 10%, and on the Mixtral-like model
#           ab-real10  the same on the Qwen1.5-MoE-A2.7B-shaped model (60 experts, top-4) with the real
#                      HarMoEny Qwen1.5-MoE routing replayed in recorded order, GPU 1 10% slower
#                      (for the run: SHAPES=512x128,2048x16 RATES=16,inf)
#           ab-fp8-10  the Qwen3-shaped model served in fp8 (--quantization fp8), GPU 1 10% slower
#           one-gpu    what of those runs on ONE GPU (vLLM's EPLB, hence GEM, needs two ranks): the
#                      Qwen1.5-MoE-shaped model with the real routing in recorded order, and the
#                      Qwen3-shaped model in fp8, each served and benchmarked without GEM
#           ab-equal   the same on the GPUs as they are, plus GEM with its recorder off
#           ab-dummy   ab-equal's placements (recorder off too) with vLLM's dummy-weight routing
#           dp2        data parallelism 2 x TP 1, EP over both GPUs, GPU 1 20% slower: vLLM's placement /
#                      GEM from the trace file, one server each (DP > 1)
#           soak       4000 requests, GPU 1 20% slower, recalibration every 500 steps
#           stale-profiles  calibrate into files, then serve with them while GPU 1 does 20% extra
#                      work: the start-up speed check should find the file stale and calibrate
#           soak-dp2   2000 requests on DP 2 x TP 1 (EP over both), GEM from the trace, GPU 1 20%
#                      slower, recalibration every 500 steps (DP ranks join its collectives)
#           soak-plain the same load on plain vLLM (the control for memory growth)
#           soak-drift the soak with the replayed routing drifting every DRIFT (4000) steps: hot
#                      experts change, so recalibration should move experts while serving
#   env: NUM_PROMPTS (1000), BENCH_REPEATS (3), SHAPES, RATES, MAX_CONCURRENCY, ONLY (config names),
#        PROFILE_PROMPTS (per placement, profile that many prompts: per-GPU MoE kernel time),
#        EPLB_COMM (vLLM's EPLB weight-transfer backend, e.g. pynccl; unset: vLLM's choice, which
#        is torch_gloo through CPU memory when NIXL is absent, as on the overlay),
#        DEADLINE (540: seconds after which a running benchmark is interrupted, so that the results
#        so far are still packed when a run is stopped after a time limit)
# Results are written straight under $RESULTS_DIR/gem-results: a run cut short keeps them.
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export VLLM_ALLREDUCE_USE_SYMM_MEM=0 VLLM_USE_FLASHINFER_SAMPLER=0
export PYTHONPATH=/tmp/vllm-site:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
dest=${RESULTS_DIR:?set RESULTS_DIR to the folder for the results}
pkill -9 -f "[v]llm.entrypoints" 2>/dev/null; sleep 1  # a server left over from a killed call
res=$dest/gem-results; mkdir -p "$res" /tmp/gem
# SIGINT at the deadline: the benchmark scripts stop their server in `finally` and the archive
# below is still written (a call killed at its limit returns no nested folders)
run_py() { timeout -s INT -k 30 $(( ${DEADLINE:-540} - SECONDS > 1 ? ${DEADLINE:-540} - SECONDS : 1 )) python3 "$@"; }
E2E_AB="--shapes ${SHAPES:-512x128} --rates ${RATES:-inf} --num-prompts ${NUM_PROMPTS:-1000} --bench-repeats ${BENCH_REPEATS:-3}${MAX_CONCURRENCY:+ --max-concurrency $MAX_CONCURRENCY}${PROFILE_PROMPTS:+ --profile-prompts $PROFILE_PROMPTS}${EPLB_COMM:+ --eplb-communicator $EPLB_COMM}"
E2E="$E2E_AB${ONLY:+ --only $ONLY}"
for s in "$@"; do
  t0=$SECONDS
  case $s in
  setup)
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    python3 -m pip install -q --no-deps --no-build-isolation -e . > "$res/install.log" 2>&1 || { echo "install failed"; tail "$res/install.log"; exit 1; }
    run_py benchmarks/e2e/make_moe_model.py /tmp/gem/model-rand --layers 6 --experts 32 --top-k 4 \
      --hidden 1024 --moe-intermediate 512 --heads 16 --random-weights 0
    run_py benchmarks/e2e/make_moe_model.py /tmp/gem/model-top1 --layers 6 --experts 32 --top-k 1 \
      --hidden 1024 --moe-intermediate 512 --heads 16 --random-weights 0
    run_py benchmarks/e2e/make_moe_model.py /tmp/gem/model-q3 --layers 12 --experts 128 --top-k 8
    run_py benchmarks/e2e/make_moe_model.py /tmp/gem/model-mix --layers 12 --experts 8 --top-k 2 \
      --moe-intermediate 5632
    # Qwen1.5-MoE-A2.7B's routed experts as a Qwen3-MoE model (vLLM's Qwen2-MoE has no EPLB
    # support); its shared expert is left out
    run_py benchmarks/e2e/make_moe_model.py /tmp/gem/model-q15 --layers 24 --experts 60 --top-k 4 \
      --hidden 2048 --moe-intermediate 1408 --heads 16
    python3 -c "from vllm_gem.evaluate import bundled_trace; from vllm_gem.formats import save; save(bundled_trace('qwen'), '/tmp/gem/trace-qwen15.msgpack')"
    python3 -m vllm_gem.cli import-trace --format synthetic benchmarks/e2e/skewed-8x12.json \
      -o /tmp/gem/trace-mix.msgpack --model mixtral-like-8x12
    python3 -m vllm_gem.cli import-trace --format synthetic benchmarks/e2e/skewed-128x12.json \
      -o /tmp/gem/trace-skewed.msgpack --model qwen3-moe-128x12
    python3 -c "import importlib.metadata as m; print([e.value for e in m.entry_points(group='vllm.general_plugins')])" ;;
  identity)
    run_py benchmarks/e2e/greedy_identity.py /tmp/gem/model-rand "$res/greedy-identity.json" --reuse-baseline \
      > "$res/greedy-identity.log" 2>&1; echo "identity exit $?"
    grep -E "vllm-gem|identical|Error|error" "$res/greedy-identity.log" | grep -v "^$" | tail -25 ;;
  identity-vllm)
    for b in baseline baseline2; do cp "$res/greedy-identity.json.$b.json" "$res/greedy-identity-vllm.json.$b.json" 2>/dev/null; done
    run_py benchmarks/e2e/greedy_identity.py /tmp/gem/model-rand "$res/greedy-identity-vllm.json" \
      --reuse-baseline --planner vllm-default > "$res/greedy-identity-vllm.log" 2>&1; echo "identity-vllm exit $?"
    grep -E "vllm-gem|identical|Error|error" "$res/greedy-identity-vllm.log" | tail -8 ;;
  identity-top1)
    run_py benchmarks/e2e/greedy_identity.py /tmp/gem/model-top1 "$res/greedy-identity-top1.json" \
      > "$res/greedy-identity-top1.log" 2>&1; echo "identity-top1 exit $?"
    grep -E "vllm-gem|identical|slots_moved|Error|error" "$res/greedy-identity-top1.log" | tail -12 ;;
  identity-switch)
    for m in rand top1; do
      run_py benchmarks/e2e/switch_identity.py /tmp/gem/model-$m "$res/switch-identity-$m.json" \
        > "$res/switch-identity-$m.log" 2>&1; echo "identity-switch $m exit $?"
      grep -E "slots: identical|not a test|Error" "$res/switch-identity-$m.log" | tail -6
    done ;;
  identity-fp32)
    run_py benchmarks/e2e/greedy_identity.py /tmp/gem/model-rand "$res/greedy-identity-fp32.json" \
      --reuse-baseline --dtype float32 > "$res/greedy-identity-fp32.log" 2>&1; echo "identity-fp32 exit $?"
    grep -E "vllm-gem|identical|Error|error" "$res/greedy-identity-fp32.log" | tail -8 ;;
  equal|slow20|slow10|mix20|dp2)
    case $s in equal) cfg=equal-gpus model=q3 ;; mix20) cfg=mix-slow20 model=mix ;; dp2) cfg=dp2-slow20 model=q3 ;;
      *) cfg=$s model=q3 ;; esac
    run_py benchmarks/e2e/serve_matrix.py /tmp/gem/model-$model "$res/e2e-$s" \
      --configs "benchmarks/e2e/configs/$cfg.json" $E2E \
      2>&1 | tee "$res/e2e-$s.log" | tail -30
    grep -h "vllm-gem" "$res/e2e-$s"/raw/serve-*.log | cut -c1-600 | tail -12 ;;
  one-gpu)
    for c in one-gpu-q15-recorded:q15 one-gpu-fp8:q3; do
      run_py benchmarks/e2e/serve_matrix.py /tmp/gem/model-${c#*:} "$res/e2e-${c%:*}" \
        --configs "benchmarks/e2e/configs/${c%:*}.json" $E2E 2>&1 | tee "$res/e2e-${c%:*}.log" | tail -4
    done ;;
  ab-*)
    sw=initial,vllm-default,gem model=q3
    case $s in
      ab-slow20|ab-slow10) cfg=${s#ab-} only=gem-${s#ab-} ;;
      ab-mix20) cfg=mix-slow20 only=gem-mix-slow20 model=mix ;;
      ab-real10) cfg=real-slow10 only=gem-real-slow10 model=q15 ;;
      ab-fp8-10) cfg=fp8-slow10 only=gem-fp8-slow10 ;;
      ab-equal) cfg=equal-gpus only=gem-r16 sw=$sw,gem:norecord ;;
      ab-dummy) cfg=equal-gpus only=gem-r16-dummy sw=$sw,gem:norecord ;;
      *) echo "unknown stage $s"; continue ;;
    esac
    run_py benchmarks/e2e/serve_matrix.py /tmp/gem/model-$model "$res/e2e-$s" \
      --configs "benchmarks/e2e/configs/$cfg.json" --only $only --switch $sw $E2E_AB \
      2>&1 | tee "$res/e2e-$s.log" | tail -32
    # what GEM planned from, and every placement it applied (the recorder's dump stays: 25 MB)
    mkdir -p "$res/e2e-$s/gem-planning" && cp /tmp/gem/traces-$only/planning-history-start.msgpack \
      /tmp/gem/traces-$only/placement-gen*.json "$res/e2e-$s/gem-planning/" 2>/dev/null
    grep -h "vllm-gem" "$res/e2e-$s"/raw/serve-*.log | cut -c1-500 | tail -8 ;;
  stale-profiles)
    # profile files of these GPUs, then a server whose GPU 1 does 20% extra work: its file is
    # stale, so the start-up speed check should calibrate every GPU instead (one warning)
    run_py -m vllm_gem.cli calibrate --experts 64 --out-dir /tmp/gem/profiles-here > "$res/stale-calibrate.log" 2>&1
    run_py benchmarks/e2e/soak.py /tmp/gem/model-q3 "$res/stale-profiles" --num-prompts 64 \
      --gem '{"profiles": ["/tmp/gem/profiles-here/profile-gpu0.json", "/tmp/gem/profiles-here/profile-gpu1.json"], "emulate_slowdown": {"1": 0.2}}' \
      2>&1 | tail -4
    grep -h "vllm-gem" "$res/stale-profiles/serve-soak.log" | grep -E "profile files|placed experts" | cut -c1-500 ;;
  soak-dp2)
    VLLM_GEM_RECALIBRATE=${RECALIBRATE:-500} run_py benchmarks/e2e/soak.py /tmp/gem/model-q3 "$res/soak-dp2" \
      --num-prompts "${SOAK_PROMPTS:-2000}" --data-parallel-size 2 \
      --gem '{"trace": "/tmp/gem/trace-skewed.msgpack", "emulate_slowdown": {"1": 0.2}}' 2>&1 | tail -22
    grep -h "vllm-gem" "$res/soak-dp2/serve-soak.log" | grep -E "recalibration|failed" | cut -c1-400 | tail -6 ;;
  soak-plain)
    run_py benchmarks/e2e/soak.py /tmp/gem/model-q3 "$res/soak-plain" --num-prompts "${SOAK_PROMPTS:-4000}" \
      --no-gem 2>&1 | tail -20 ;;
  soak|soak-drift)
    drift=; [ $s = soak-drift ] && drift=${DRIFT:-4000}
    VLLM_GEM_ROUTING_DRIFT_STEPS=$drift VLLM_GEM_RECALIBRATE=${RECALIBRATE:-500} run_py benchmarks/e2e/soak.py \
      /tmp/gem/model-q3 "$res/$s" --num-prompts "${SOAK_PROMPTS:-4000}" ${EPLB_COMM:+--eplb-communicator $EPLB_COMM} --gem '{"emulate_slowdown": {"1": 0.2}}' \
      2>&1 | tail -22
    grep -h "vllm-gem" "$res/$s/serve-soak.log" | grep -E "drift|'applied': True|failed" | cut -c1-400 | tail -8 ;;
  esac
  echo "[stage $s: $((SECONDS - t0)) s]"
done
bash benchmarks/gpu/pack.sh "$dest" plugin
