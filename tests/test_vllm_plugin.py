"""The vLLM plugin on CPU, against the real vllm package: registration, flags, config flow,
the decision's map format, the weight move (two gloo ranks), recorder, routing replay, metrics."""

import datetime
import importlib.metadata
import json
import os
import tempfile
import types
from pathlib import Path

import numpy as np
import pytest

from vllm_gem.calibrate import SpeedCheck
from vllm_gem.errors import GemInputError
from vllm_gem.formats import (
    GpuState,
    NdArray,
    Placement,
    RoutingTrace,
    rank_of_slots,
    save,
    validate_placement,
)
from vllm_gem.profiles import example_profile

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def parser():
    import vllm.platforms as platforms
    platforms.current_platform.device_type = "cpu"  # the CUDA wheel cannot infer it without a GPU
    from vllm.entrypoints.openai.cli_args import make_arg_parser
    from vllm.plugins import load_general_plugins
    from vllm.utils.argparse_utils import FlexibleArgumentParser
    load_general_plugins()
    return make_arg_parser(FlexibleArgumentParser())


def engine_args(parser, *argv):
    from vllm.engine.arg_utils import AsyncEngineArgs
    return AsyncEngineArgs.from_cli_args(parser.parse_args(["--model", "m", *argv]))


# ---------------------------------------------------------------- registration and flags
def test_entry_point_is_registered_and_idempotent():
    eps = importlib.metadata.entry_points(group="vllm.general_plugins")
    gem = [ep for ep in eps if ep.name == "gem"]
    assert [ep.value for ep in gem] == ["vllm_gem.plugin:register"]
    register = gem[0].load()
    from vllm.engine.arg_utils import EngineArgs
    register()
    patched = EngineArgs.add_cli_args
    register()  # vLLM loads plugins in every process, sometimes twice in one
    assert EngineArgs.add_cli_args is patched
    from vllm.v1.worker.gpu_worker import Worker  # patched when (and only if) it is imported
    assert hasattr(Worker.load_model, "__wrapped__") and hasattr(Worker.shutdown, "__wrapped__")
    assert not hasattr(Worker.load_model.__wrapped__, "__wrapped__")  # wrapped once


def test_installed_but_not_asked_changes_nothing(parser):
    from vllm_gem.vllm.flags import prepare_engine_args
    ea = engine_args(parser, "--enable-expert-parallel", "-tp", "2")
    prepare_engine_args(ea)
    assert ea.additional_config == {} and ea.enable_eplb is False
    assert ea.eplb_config.step_interval == 3000


def test_plugin_flag_is_sugar_for_additional_config(parser):
    from vllm_gem.vllm.config import from_additional
    from vllm_gem.vllm.flags import NO_PERIODIC_REBALANCE, prepare_engine_args
    ea = engine_args(parser, "--enable-expert-parallel", "-tp", "2", "--plugin", "gem",
                     "--gem-trace", "/data/t.msgpack", "--gem-strict",
                     "--additional-config", '{"gem": {"min_gain": 0.05}, "other": 1}')
    assert ea.additional_config["gem"] == {"min_gain": 0.05, "trace": "/data/t.msgpack", "strict": True}
    assert ea.additional_config["other"] == 1
    prepare_engine_args(ea)
    assert ea.enable_eplb and ea.eplb_config.step_interval == NO_PERIODIC_REBALANCE
    cfg = from_additional(ea.additional_config)
    assert cfg.trace == "/data/t.msgpack" and cfg.strict and cfg.min_gain == 0.05
    assert cfg.state_dir and str(os.getpid()) in cfg.state_dir
    # the dict is what travels to engine core and workers inside VllmConfig
    same = engine_args(parser, "--enable-expert-parallel", "--additional-config",
                       '{"gem": {"trace": "/data/t.msgpack"}}')
    assert from_additional(same.additional_config).trace == "/data/t.msgpack"


def test_user_eplb_settings_are_kept(parser):
    from vllm_gem.vllm.flags import prepare_engine_args
    ea = engine_args(parser, "--enable-expert-parallel", "--enable-eplb", "--plugin", "gem",
                     "--eplb-config", '{"step_interval": 500}')
    prepare_engine_args(ea)
    assert ea.eplb_config.step_interval == 500


@pytest.mark.parametrize("argv, field", [
    (["--plugin", "nope"], "--plugin: value"),
    (["--gem-trace", "x"], "--gem-*: flags"),
])
def test_unknown_flags_fail_the_parse(parser, argv, field):
    from vllm_gem.vllm.flags import prepare_engine_args
    with pytest.raises(GemInputError, match=field.replace("*", r"\*")):
        prepare_engine_args(engine_args(parser, "--enable-expert-parallel", *argv))


BAD_SETTINGS = [
    ({"record_capacity": "many"}, {}, "record_capacity: is 'many'; expected an integer"),
    ({"no_such_option": 1}, {}, "gem: has 'no_such_option', which is not a GEM option"),
    ({"min_gain": 2}, {}, "min_gain: is 2; expected a finite number in [-1, 1)"),
    ({"calibration_time_limit_s": 0}, {}, "calibration_time_limit_s: is 0"),
    ({"speed_tolerance": float("nan")}, {}, "speed_tolerance: is nan"),
    ({"planner": "fastest"}, {}, "planner: is 'fastest'"),
    ({}, {"VLLM_GEM_RECALIBRATE": "abc"}, "VLLM_GEM_RECALIBRATE: value: is 'abc'"),
    ({}, {"VLLM_GEM_RECALIBRATE": "-5"}, "VLLM_GEM_RECALIBRATE: value: is '-5'"),
    ({}, {"VLLM_GEM_RECALIBRATE": "1e99"}, "VLLM_GEM_RECALIBRATE: value: is '1e99'"),
]


@pytest.mark.parametrize("gem, env, message", BAD_SETTINGS)
def test_bad_settings_warn_and_serve_without_gem(parser, caplog, monkeypatch, gem, env, message):
    from vllm_gem.vllm.config import from_additional
    from vllm_gem.vllm.flags import prepare_engine_args
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ea = engine_args(parser, "--enable-expert-parallel", "--plugin", "gem",
                     "--additional-config", json.dumps({"gem": gem}))
    prepare_engine_args(ea)  # does not raise: vLLM starts
    assert from_additional(ea.additional_config) is None  # GEM off in every process
    warnings = [r for r in caplog.records if r.levelname == "WARNING" and "vllm-gem" in r.message]
    assert len(warnings) == 1 and message in warnings[0].message
    assert "vLLM's own placement" in warnings[0].message


@pytest.mark.parametrize("gem, env, message", BAD_SETTINGS)
def test_bad_settings_fail_the_start_in_strict_mode(parser, monkeypatch, gem, env, message):
    from vllm_gem.vllm.flags import prepare_engine_args
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    ea = engine_args(parser, "--enable-expert-parallel", "--plugin", "gem", "--gem-strict",
                     "--additional-config", json.dumps({"gem": gem}))
    with pytest.raises(GemInputError) as e:
        prepare_engine_args(ea)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_without_expert_parallel_gem_warns_or_fails_in_strict(parser, caplog):
    from vllm_gem.vllm.config import from_additional
    from vllm_gem.vllm.flags import prepare_engine_args
    ea = engine_args(parser, "--plugin", "gem")
    prepare_engine_args(ea)
    assert from_additional(ea.additional_config) is None  # switched off, vLLM serves as usual
    assert "--enable-expert-parallel" in caplog.text
    with pytest.raises(GemInputError, match="enable_expert_parallel"):
        prepare_engine_args(engine_args(parser, "--plugin", "gem", "--gem-strict"))


def test_recalibration_environment_variable(monkeypatch):
    from vllm_gem.vllm.config import DEFAULT_RECALIBRATE_STEPS, RECALIBRATE_ENV, parse
    cfg = parse({})
    assert cfg.recalibrate_interval == 0  # off by default
    for raw, want in [("1", DEFAULT_RECALIBRATE_STEPS), ("500", 500), ("off", 0)]:
        monkeypatch.setenv(RECALIBRATE_ENV, raw)
        assert cfg.recalibrate_interval == want
    monkeypatch.setenv(RECALIBRATE_ENV, "often")
    with pytest.raises(GemInputError, match=RECALIBRATE_ENV):
        _ = cfg.recalibrate_interval


# ---------------------------------------------------------------- the decision
def skewed_loads(steps=40, layers=3, experts=16, seed=0):
    rng = np.random.default_rng(seed)
    base = rng.zipf(1.6, size=(layers, experts)).clip(1, 50).astype(float)
    return rng.poisson(base[None] * 20, size=(steps, layers, experts)).astype(float)


def test_decision_is_a_valid_vllm_map_and_respects_min_gain():
    import torch
    from vllm.distributed.eplb.eplb_state import compute_logical_maps

    from vllm_gem.vllm.planning import decide, group_from_profiles
    loads = skewed_loads()
    profiles = [example_profile("fast", 1.0, num_experts=12), example_profile("slow", 1.25, num_experts=12)]
    layers, experts, num_physical = 3, 16, 24
    old = np.tile(np.arange(num_physical) % experts, (layers, 1))
    d = decide(loads, profiles, old)
    assert d.phys_to_log.shape == (layers, num_physical) and d.phys_to_log.dtype == np.int64
    validate_placement(Placement(num_logical_experts=experts, num_ranks=2,
                                 phys_to_log=d.phys_to_log.tolist(),
                                 rank_of_slot=rank_of_slots(num_physical, 2), planner="gem"),
                       "decision", num_layers=layers, num_logical_experts=experts, num_ranks=2)
    log2phys, count = compute_logical_maps(torch.from_numpy(d.phys_to_log), experts)
    assert (count >= 1).all() and int(count.sum()) == layers * num_physical
    assert d.apply and d.gain > 0.05  # the slow GPU got less work than linear gives it
    assert d.rank_us_after[1] < d.rank_us_before[1]
    assert 0 < d.predicted_bound_us <= d.predicted_after_us  # GEM's share of the ceiling is reportable
    # the ranks' fitted models travel with the report, to recheck predictions and bounds offline
    assert np.allclose(d.info["latency_coef"], group_from_profiles(profiles).coef, atol=1e-5)
    json.dumps(d.info)
    # recalibration leaves the LP out of its reported bound (a valid, looser one): no stall for it
    quick = decide(loads, profiles, old, lp_bound=False)
    assert 0 < quick.predicted_bound_us <= d.predicted_bound_us
    keep = decide(loads, profiles, d.phys_to_log, min_gain=0.5)
    assert not keep.apply  # hysteresis: no move for a small predicted gain
    same = decide(loads, profiles, d.phys_to_log, min_gain=-1.0, target=d.phys_to_log)
    assert not same.apply and same.info["move_check"] == "the plan is the map in use"  # even forced
    # experts that stay on their rank keep their slot: only rank changes are copied
    for r in range(2):
        part = slice(12 * r, 12 * (r + 1))
        stay = np.array([[e in set(d.phys_to_log[ly, part]) for e in old[ly, part]] for ly in range(layers)])
        assert (d.phys_to_log[:, part][stay] == old[:, part][stay]).all()


def test_recalibration_moves_only_when_the_saving_beats_the_move():
    from vllm_gem.vllm.planning import decide, saving_horizon, worth_moving
    profiles = [example_profile("fast", 1.0, num_experts=12), example_profile("slow", 1.25, num_experts=12)]
    old = np.tile(np.arange(24) % 16, (3, 1))
    d = decide(skewed_loads(), profiles, old)
    per_step_s = (d.predicted_before_us - d.predicted_after_us) * 1e-6 * 3
    changed = int((d.phys_to_log != old).sum())
    slot_bytes, bw = 10_000_000, 1e10
    cost_s = changed * slot_bytes / bw
    ok, why = worth_moving(d, old, slot_bytes, bw, horizon_steps=int(2 * cost_s / per_step_s) + 1)
    assert ok and f"moving {changed} slots" in why
    ok, _ = worth_moving(d, old, slot_bytes, bw, horizon_steps=max(int(0.5 * cost_s / per_step_s), 1))
    assert not ok  # not worth it over a short horizon
    # ... but worth it once the placement in use has served long enough: routing that held
    # that long is expected to hold about as long again
    interval = max(int(0.5 * cost_s / per_step_s), 1)
    assert saving_horizon(interval, steps_since_move=3) == interval
    assert worth_moving(d, old, slot_bytes, bw, saving_horizon(interval, int(4 * cost_s / per_step_s)))[0]
    # min_gain still rules, and the refusal names it: an operator reading the log must see
    # which threshold stopped the move, not only its cost
    d = decide(skewed_loads(), profiles, old, min_gain=0.99)
    ok, why = worth_moving(d, old, slot_bytes, bw, horizon_steps=10**9)
    assert not ok and why.startswith("predicted gain ") and "is not above min_gain 99.0%" in why


def test_decision_rejects_a_trace_of_another_model():
    from vllm_gem.vllm.planning import check_trace_matches
    tr = RoutingTrace(model="m", source="t", counts=NdArray.from_numpy(np.ones((2, 4, 8), np.int32)))
    with pytest.raises(GemInputError, match=r"t.msgpack: counts.shape: is 4 layers x 8 experts.*48 MoE"):
        check_trace_matches(tr, "t.msgpack", 48, 128)


# ---------------------------------------------------------------- the weight move
def _weights_of(layer, logical):
    import torch
    g = torch.Generator().manual_seed(1000 * layer + int(logical))
    return torch.randn(2 * 4 * 6, generator=g).to(torch.bfloat16), torch.randn(6 * 4, generator=g)


def _fake_model_state(rank, world, layers, num_physical, experts=16, distinct_replicas=False):
    """An EplbModelState-like object on CPU holding FusedMoE-shaped expert weights whose values
    identify their logical expert, with a gloo communicator (test only)."""
    import torch
    import torch.distributed as dist
    from vllm.distributed.eplb.eplb_communicator import EplbCommunicator
    from vllm.distributed.eplb.eplb_state import compute_logical_maps

    class GlooCommunicator(EplbCommunicator):  # CPU tensors straight over gloo
        def __init__(self):
            self.ops = []

        def add_send(self, tensors, dst_rank, expert_id):
            self.ops += [dist.P2POp(dist.isend, t.contiguous(), dst_rank) for t in tensors]

        def add_recv(self, tensors, src_rank, expert_id):
            self.ops += [dist.P2POp(dist.irecv, t, src_rank) for t in tensors]

        def execute(self):
            if self.ops:
                for r in dist.batch_isend_irecv(self.ops):
                    r.wait()
            self.ops = []

    local = num_physical // world
    old = torch.tensor(np.tile(np.arange(num_physical) % experts, (layers, 1)))
    mine = old[:, rank * local:(rank + 1) * local]
    # vLLM's dummy weights fill every physical slot differently, replicas included
    shift = [1.0 if distinct_replicas and rank * local + s >= experts else 0.0 for s in range(local)]
    # FusedMoE's layout seen by EPLB: every parameter as [E_local, -1]
    expert_weights = [[torch.stack([_weights_of(ly, e)[i] + shift[s] for s, e in enumerate(mine[ly])])
                       for i in (0, 1)] for ly in range(layers)]
    log2phys, count = compute_logical_maps(old, experts)
    pad = torch.full((layers, experts, 1024), -1, dtype=log2phys.dtype)  # vLLM's padded width
    pad[..., :log2phys.shape[-1]] = log2phys
    moe = types.SimpleNamespace(w13_weight=torch.empty(local, 2 * 768, 2048, device="meta"),
                                w2_weight=torch.empty(local, 2048, 768, device="meta"))
    model = types.SimpleNamespace(num_logical_experts=experts, expert_weights=expert_weights,
                                  num_moe_layers=layers, num_expert_groups=1, modules=lambda: [moe])
    return types.SimpleNamespace(
        model=model, physical_to_logical_map=old.clone(), logical_to_physical_map=pad,
        logical_replica_count=count.clone(), expert_buffer=[torch.empty_like(w) for w in expert_weights[0]],
        communicator=GlooCommunicator(),
        expert_load_pass=torch.ones(layers, num_physical, dtype=torch.int32),
        expert_load_window=torch.ones(1, layers, num_physical, dtype=torch.int32))


def _holds_its_experts(ms, rank, world, copies=(0.0,)):
    """Every local slot holds (a copy of) the weights of the logical expert the map names."""
    import torch
    layers, num_physical = ms.physical_to_logical_map.shape
    local = num_physical // world
    here = ms.physical_to_logical_map[:, rank * local:(rank + 1) * local]
    w = ms.model.expert_weights
    return all(any(all(torch.equal(w[ly][i][s], _weights_of(ly, here[ly, s])[i] + c) for i in (0, 1))
                   for c in copies)
               for ly in range(layers) for s in range(local))


def _inject_transfer_fault(fault, rank):
    """One faulty call of vLLM's transfer (one call per layer); the restore's calls are sound.
    swap: the first layer delivers the wrong expert; interrupt-all: every rank fails before the
    second layer moves; interrupt-one: rank 1 fails after the second layer's exchange; lose:
    the first layer wipes rank 0's slots (experts only it held are gone)."""
    from vllm.distributed.eplb import rebalance_execute
    real, calls = rebalance_execute.rearrange_expert_weights_inplace, []

    def faulty(*a, **k):
        calls.append(1)
        if fault == "interrupt-all" and len(calls) == 2:
            raise RuntimeError("CUDA out of memory")  # every rank, before the layer moves
        real(*a, **k)
        w = a[2][0][0]
        if fault == "swap" and len(calls) == 1:  # delivers the wrong expert
            w[[0, 1]] = w[[1, 0]]
        if fault == "interrupt-one" and len(calls) == 2 and rank == 1:
            raise RuntimeError("illegal memory access")  # one rank, after the exchange
        if fault == "lose" and len(calls) == 1 and rank == 0:
            w.zero_()  # every slot of this rank in layer 0
    rebalance_execute.rearrange_expert_weights_inplace = faulty


def _move_worker(rank, world, init, new_map, fault, out, distinct_replicas=False):
    import torch
    import torch.distributed as dist

    from vllm_gem.vllm import apply as gem_apply

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    layers, num_physical = new_map.shape
    ms = _fake_model_state(rank, world, layers, num_physical, distinct_replicas=distinct_replicas)
    old = ms.physical_to_logical_map.clone()
    if fault:
        _inject_transfer_fault(fault, rank)
    group = types.SimpleNamespace(device_group=dist.group.WORLD)
    report = None
    try:
        report = gem_apply.apply_placement(ms, torch.from_numpy(new_map), group)
        status = "ok"
    except gem_apply.WeightIntegrityError as e:
        status = f"integrity: {e}"
    except gem_apply.WeightsLostError as e:
        status = f"lost: {e}"
    new = torch.from_numpy(new_map)
    exact = _holds_its_experts(ms, rank, world, (0.0, 1.0) if distinct_replicas else (0.0,))
    committed = ms.physical_to_logical_map
    maps_ok = torch.equal(committed, new) and bool((ms.expert_load_pass == 0).all())
    torch.save({"status": status, "exact": exact, "maps_ok": maps_ok, "maps_old": torch.equal(committed, old),
                "changed": report.slots_changed if report else -1}, f"{out}/rank{rank}.pt")
    dist.barrier()  # no rank tears gloo down while a peer still uses it (an abort on 2-core CI)
    dist.destroy_process_group()


def _run_move(new_map, fault=None, distinct_replicas=False):
    import torch
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_move_worker, args=(2, f"file://{tmp}/rdv", new_map, fault, tmp, distinct_replicas),
                 nprocs=2)
        return [torch.load(f"{tmp}/rank{r}.pt") for r in range(2)]


def _cross_rank_plan():
    from vllm_gem.vllm.planning import decide
    profiles = [example_profile("fast", 1.0, num_experts=12), example_profile("slow", 1.3, num_experts=12)]
    old = np.tile(np.arange(24) % 16, (3, 1))
    d = decide(skewed_loads(), profiles, old)
    assert (d.phys_to_log[:, :12] != old[:, :12]).any()  # experts really cross ranks
    assert (d.phys_to_log != old).any(1).all()  # every layer moves: a fault at layer 1 is mid-move
    return d.phys_to_log


def test_weight_move_across_two_ranks_keeps_every_expert():
    res = _run_move(_cross_rank_plan())
    assert all(r["status"] == "ok" and r["exact"] and r["maps_ok"] for r in res), res
    assert res[0]["changed"] > 0


def test_replicas_that_differ_before_the_move_are_not_an_error():
    # seen on 2xH200 with --load-format dummy and redundant experts: each slot is random
    res = _run_move(_cross_rank_plan(), distinct_replicas=True)
    assert all(r["status"] == "ok" and r["exact"] for r in res), res


@pytest.mark.parametrize("fault, message", [
    ("swap", "integrity: after the move, layer 0 slot 0 (and 3 more) did not hold the weights of "),
    ("interrupt-all", "integrity: the move was interrupted at layer 1 on EP rank 0: RuntimeError: CUDA out"),
    ("interrupt-one", "integrity: the move was interrupted at layer 1 on EP rank 1: RuntimeError: illegal"),
])
def test_a_failed_move_is_undone_and_the_old_placement_verified(fault, message):
    res = _run_move(_cross_rank_plan(), fault=fault)
    for r in res:  # same verdict on every rank; old weights back in every slot, old maps kept
        assert r["status"].startswith(message), r["status"]
        assert r["status"].endswith("restored the old placement (every slot verified)")
        assert r["maps_old"] and r["exact"], r


def test_a_move_that_destroys_the_only_copy_of_an_expert_says_so():
    res = _run_move(_cross_rank_plan(), fault="lose")
    for r in res:
        assert r["status"].startswith("lost: after the move, layer 0 slot 0"), r["status"]
        assert "no intact copy is left of (layer, expert) [(0, " in r["status"]
        assert r["status"].endswith("restart the server") and r["maps_old"]


# ---------------------------------------------------------------- a worker's start-up placement
def _step_until_the_plan_is_applied(w):
    """Engine steps after a background recalibration started: -> the report of the one
    recalibration finished, exactly at its due step."""
    due, reports, serve = w.placer.pending.due_step, [], w.recalibration.serving_safely
    w.recalibration.serving_safely = lambda part: reports.append(serve(part)) or reports[-1]
    while w.placer.pending is not None:
        w.after_step()
    del w.recalibration.serving_safely
    assert w.progress.steps == due and len(reports) == 1
    return reports[0]


def _place_worker(rank, world, init, cfg, fail_rank, out, inactive_rank=None, lose=False, switches=(),
                  speeds=(), dp=1, gpu_uuids=(), missing_on_rank=None, precision=None):
    import torch
    import torch.distributed as dist

    from vllm_gem.vllm import entry, runtime
    from vllm_gem.vllm.config import parse

    # a collective that only some ranks join fails in 60 s instead of hanging CI for 30 min
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    if lose:  # the first layer's transfer wipes rank 0's slots: experts only it held are gone
        _inject_transfer_fault("lose", rank)
    ms = _fake_model_state(rank, world, layers=3, num_physical=24)
    ep = types.SimpleNamespace(rank_in_group=rank, world_size=world, ranks=list(range(world)),
                               cpu_group=dist.group.WORLD, device_group=dist.group.WORLD)
    w = runtime.GemWorker.build(parse(cfg), ms, ep, dp_size=dp, model_name="fake-moe")
    if rank == missing_on_rank:  # the profile files are not on this rank's node
        cfg = {**cfg, "profiles": [f + ".not-here" for f in cfg["profiles"]]}
        w.ctx.cfg = parse(cfg)
    if gpu_uuids:  # the GPU each rank runs on, as NVML names it
        w.gpus.local_gpu_uuid = lambda: gpu_uuids[rank]
    histories = []  # what each rank read as the routing history
    read_history = w.placer.routing_history
    w.placer.routing_history = lambda *a, **k: histories.append(read_history(*a, **k)) or histories[-1]
    if fail_rank is not None:  # calibrate instead of reading files; one rank's GPU fails
        def local_profile(quick=False):
            if rank == fail_rank:
                raise RuntimeError("CUDA error: an illegal memory access was encountered")
            return example_profile(f"gpu{rank}", 1.0 + 0.3 * rank, num_experts=12)
        w.gpus.local_profile = local_profile
    profiled = []
    if precision:  # the served experts' precision, as experts.served_precision reads it
        w.ctx.precision = precision
    if speeds or precision or any(s.startswith("recalibrate") for s in switches):  # stand-ins, counted
        def local_profile(quick=False):
            profiled.append(quick)
            return example_profile(f"gpu{rank}", 1.0 + 0.3 * rank, num_experts=12)
        w.gpus.local_profile = local_profile
    if speeds:  # speed checks (start-up's first), each GPU time / its profile's at 8 points:
        left = list(speeds)  # rank 1's (rank 0: 1.0), or (rank 0's, rank 1's), or an error

        def local_speed_check(reference, lift_s):
            s = left.pop(0)
            r = s[rank] if isinstance(s, tuple) else s if rank == 1 else 1.0
            if isinstance(r, str):
                raise RuntimeError(r)
            clock = GpuState(sm_clock_mhz=1500.0 + rank, mem_clock_mhz=3201.0, power_w=300.0,
                             temperature_c=40.0)  # as NVML reads it: travels in the gather
            return SpeedCheck(r, 8, 0.1, (r,) * 8, clock, clock)
        w.gpus.local_speed_check = local_speed_check
    entry._WORKER = w
    if rank == inactive_rank:  # GEM could not attach on this rank
        from vllm.distributed import parallel_state
        parallel_state.get_ep_group = lambda: ep
        entry._WORKER = None
    try:
        report = entry.place_at_start(None)
    except Exception as e:
        report = {"raised": f"{type(e).__name__}: {e}"}
    start_map = ms.physical_to_logical_map.clone()
    after = []  # A/B switches on request, after the start-up placement
    if "recalibrate-fails" in switches:  # the recalibration's planner raises while it plans
        import vllm_gem.vllm.placing as placing

        def failing_decide(*a, **k):
            raise ValueError("the planner failed while planning")
        placing.decide = failing_decide
    for planner in switches:
        if planner.startswith("recalibrate"):  # recorded steps of skewed traffic, then recalibrate
            phys = torch.as_tensor(skewed_loads()[0]).gather(1, ms.physical_to_logical_map)
            for step in range(8):  # with DP, each rank routes its own share (rank r: r + 1 times)
                if dp > 1 and step % 4 == 1 + rank:  # and runs a dummy batch now and then
                    w.recorder.record_idle()
                else:
                    w.recorder.record(phys.to(torch.int32) * (rank + 1 if dp > 1 else 1),
                                      ms.physical_to_logical_map)
            rep = w.recalibration.recalibrate(8)
            if planner == "recalibrate+switch":  # an A/B switch lands while the plan is made
                assert entry.switch_placement(None, "initial")["applied"]
            if w.placer.pending is not None:  # planning in the background: serve on until it is due
                assert rep is None
                rep = _step_until_the_plan_is_applied(w)
        else:
            rep = entry.switch_placement(None, planner)
        after.append({"report": rep, "holds": _holds_its_experts(ms, rank, world),
                      "map": ms.physical_to_logical_map.clone()})
    torch.save({"report": report, "holds": _holds_its_experts(ms, rank, world),
                "map": ms.physical_to_logical_map.clone(), "switches": after,
                "start_map": start_map, "profiled": profiled,
                "histories": [torch.as_tensor(h) for h in histories],
                "recorded": torch.as_tensor(w.recorder.history(8, keep_idle=True).astype(np.float64))},
               f"{out}/rank{rank}.pt")
    dist.barrier()  # no rank tears gloo down while a peer still uses it (an abort on 2-core CI)
    dist.destroy_process_group()


def _run_place(cfg, fail_rank=None, world=2, inactive_rank=None, lose=False, switches=(), speeds=(),
               dp=1, gpu_uuids=(), missing_on_rank=None, precision=None):
    import torch
    import torch.multiprocessing as mp
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_place_worker, nprocs=world, args=(world, f"file://{tmp}/rdv", cfg, fail_rank, tmp,
                                                    inactive_rank, lose, tuple(switches), tuple(speeds),
                                                    dp, tuple(gpu_uuids), missing_on_rank, precision))
        return [torch.load(f"{tmp}/rank{r}.pt") for r in range(world)]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("inputs")
    shape = example_profile("x").expert
    files = []
    for r, slow in enumerate((1.0, 1.3)):
        files.append(str(d / f"gpu{r}.json"))
        save(example_profile(f"gpu{r}", slow, num_experts=12, shape=shape), files[-1])
    trace = d / "trace.msgpack"
    counts = NdArray.from_numpy(skewed_loads().astype(np.int32))
    save(RoutingTrace(model="m", source="t", counts=counts), trace)
    wrong = d / "wrong.msgpack"
    save(RoutingTrace(model="m", source="t", counts=NdArray.from_numpy(np.ones((4, 3, 60), np.int32))), wrong)
    return {"profiles": files, "trace": str(trace), "wrong": str(wrong), "dir": str(d)}


def test_start_up_placement_from_files_moves_experts_and_exports(inputs, caplog):
    import torch

    from vllm_gem.formats import Placement, load
    from vllm_gem.vllm.metrics import read_states
    state = inputs["dir"] + "/state"
    cfg = {"profiles": inputs["profiles"], "trace": inputs["trace"], "state_dir": state,
           "trace_dir": inputs["dir"]}
    res = _run_place(cfg)
    rep = [r["report"] for r in res]
    assert all(r.get("applied") for r in rep), rep
    assert rep[0]["predicted_gain"] > 0.05 and rep[0]["rank_us_after"][1] < rep[0]["rank_us_before"][1]
    assert all(r["holds"] for r in res) and torch.equal(res[0]["map"], res[1]["map"])
    assert (res[0]["map"][:, :12] != torch.as_tensor(np.tile(np.arange(24) % 16, (3, 1)))[:, :12]).any()
    assert [s.generation for s in read_states(state)] == [1, 1]
    saved = load(inputs["dir"] + "/placement-gen1.json", Placement)
    assert saved.phys_to_log == res[0]["map"].tolist()
    # the history the plan came from is kept for offline checks: here, the trace file's
    planned_from = load(inputs["dir"] + "/planning-history-start.msgpack", RoutingTrace)
    assert np.array_equal(planned_from.loads, load(inputs["trace"], RoutingTrace).loads)
    # the decision and the profiles planned with are logged for `vllm-gem report`
    from vllm_gem.formats import GpuProfile, load_events
    [ev] = load_events(inputs["dir"] + "/gem-events.jsonl")
    assert ev.reason == "start" and ev.applied and ev.generation == 1
    assert ev.rank_us_after == pytest.approx(rep[0]["rank_us_after"], abs=0.01)
    assert [load(inputs["dir"] + f"/profile-rank{r}.json", GpuProfile).gpu.name
            for r in range(2)] == ["gpu0", "gpu1"]
    from vllm_gem.report import write_report
    summary = write_report([inputs["dir"]], inputs["dir"] + "/../report.html")
    assert summary["sections"][-2:] == ["Predicted per-rank layer time", "Placement decisions"]

    # the engine's start-up log names vLLM's EPLB communicator and the move's rate, and warns
    # when the weights went through CPU memory (vLLM's choice without NIXL)
    import logging

    from vllm_gem.vllm import engine
    for communicator, warned in (("torch_gloo", True), ("pynccl", False)):
        core = types.SimpleNamespace(vllm_config=types.SimpleNamespace(
            additional_config={"gem": {"trace": inputs["trace"]}},
            parallel_config=types.SimpleNamespace(eplb_config=types.SimpleNamespace(communicator=communicator))),
            collective_rpc=lambda fn: rep)
        with caplog.at_level(logging.INFO, logger="vllm.gem"):
            caplog.clear()
            engine.place_before_serving(core)
        text = caplog.text
        assert f"GiB/s, vLLM EPLB communicator {communicator})" in text, text
        assert ("moved through CPU memory" in text) == warned, text


def test_profile_files_of_another_precision_are_recalibrated_or_refused_in_strict_mode(inputs):
    # bf16 profile files for fp8 experts: the latency curve of another kernel
    cfg = {"profiles": inputs["profiles"], "trace": inputs["trace"]}
    res = _run_place(cfg, precision="fp8-block")
    assert all(r["report"].get("applied") for r in res), [r["report"] for r in res]
    assert all(r["profiled"] == [False] for r in res)  # every GPU calibrated, in fp8-block
    assert res[0]["report"]["profiles_from"] == "calibration (profile files not fp8-block)"
    strict = _run_place({**cfg, "strict": True}, precision="fp8-block")
    for r in strict:
        assert r["report"]["raised"] == (
            f"GemInputError: {inputs['profiles'][0]}: expert.dtype: is bf16 (bfloat16, scales none); "
            "expected the served experts' fp8-block (float8_e4m3fn, scales block): "
            "`vllm-gem calibrate --dtype fp8-block`"), r["report"]
        assert r["profiled"] == []


def test_recording_only_runs_no_warm_up_even_with_data_parallelism(caplog):
    # the dp2 benchmark's control (place=false, no trace) was refused as if it needed a warm-up
    import logging

    from vllm_gem.vllm import engine
    core = types.SimpleNamespace(vllm_config=types.SimpleNamespace(
        additional_config={"gem": {"place": False}},
        parallel_config=types.SimpleNamespace(data_parallel_size=2)),
        collective_rpc=lambda fn: [{"applied": False, "why": "place=false: recording only"}] * 2)
    with caplog.at_level(logging.INFO, logger="vllm.gem"):
        engine.place_before_serving(core)  # a warm-up would need a real engine core
    assert "failed" not in caplog.text
    assert "kept vLLM's placement: place=false: recording only" in caplog.text


def test_four_ranks_like_two_nodes_of_two_agree_on_one_placement(inputs, tmp_path):
    # the multi-process path of a multi-node EP group, on one host: 4 ranks, 4 profiles
    profiles = []
    for r, slow in enumerate((1.0, 1.0, 1.15, 1.3)):
        profiles.append(str(tmp_path / f"g{r}.json"))
        prof = example_profile(f"gpu{r}", slow, num_experts=6)
        prof.error = 0.0  # taken as exact: the plan balances the predicted times themselves
        save(prof, profiles[-1])
    res = _run_place({"profiles": profiles, "trace": inputs["trace"]}, world=4)
    assert all(r["report"].get("applied") and r["holds"] for r in res), [r["report"] for r in res]
    assert all(r["map"].equal(res[0]["map"]) for r in res)
    us = res[0]["report"]["rank_us_after"]
    assert us[3] <= max(us[:2]) * 1.05  # the slowest GPU is not left as the straggler


def test_switching_placements_on_request_restores_the_start_map_and_keeps_every_expert(inputs):
    # the A/B benchmark's path: start-up GEM, then vLLM's start map, vLLM's policy, GEM again
    res = _run_place({"profiles": inputs["profiles"], "trace": inputs["trace"]},
                     switches=["initial", "initial", "vllm-default", "gem", "no-such-planner"])
    initial = np.tile(np.arange(24) % 16, (3, 1)).tolist()
    start = res[0]["report"]

    def per_rank(m):  # [layers, 24] -> sorted experts of each rank's 12 slots
        return np.sort(m.numpy().reshape(3, 2, 12), axis=-1).tolist()

    for r in res:
        assert r["report"]["applied"] and all(s["holds"] for s in r["switches"])
        to_initial, again, vllm_policy, gem, bad = r["switches"]
        assert to_initial["report"]["applied"] and to_initial["map"].tolist() == initial
        # planned from the start's inputs: going back predicts what GEM's plan started from
        assert to_initial["report"]["predicted_layer_us_after"] == start["predicted_layer_us_before"]
        assert again["report"] == {**again["report"], "applied": False, "why": "the plan is the map in use"}
        assert vllm_policy["report"]["applied"] and vllm_policy["report"]["planner"] == "vllm-default"
        # same inputs, same plan: each rank holds the same experts (slots follow the map before)
        assert gem["report"]["applied"] and per_rank(gem["map"]) == per_rank(r["start_map"])
        assert not vllm_policy["map"].equal(gem["map"])
        assert gem["report"]["predicted_layer_us_after"] == start["predicted_layer_us_after"]
        assert bad["report"]["applied"] is False and "no-such-planner" in bad["report"]["why"]
        assert bad["map"].equal(gem["map"])
        json.dumps([s["report"] for s in r["switches"]])  # what /collective_rpc sends back
    assert all(a["map"].equal(b["map"]) for a, b in zip(res[0]["switches"], res[1]["switches"], strict=True))


def test_recalibration_reprofiles_the_gpus_every_nth_time_and_replans_in_between(inputs):
    res = _run_place({"profiles": inputs["profiles"], "trace": inputs["trace"], "reprofile_every": 3,
                      "speed_tolerance": 0}, switches=["recalibrate"] * 5)
    for r in res:
        reps = [s["report"] for s in r["switches"]]
        assert all(rep is not None for rep in reps), reps  # none failed
        assert [rep["profiled"] for rep in reps] == [True, False, False, True, False]
        assert r["profiled"] == [True, True]  # quick profiles, at the 1st and the 4th only
        assert all(rep["profile_seconds"] < 1.0 for rep in reps if not rep["profiled"])
        assert not any("speed_ratios" in rep for rep in reps)  # tolerance 0: no speed checks
        assert r["holds"]


def test_recalibration_reprofiles_only_when_a_gpus_speed_moved_against_the_others(inputs):
    # the GPUs at each check: rank 1's file at start, then as profiled, both 10% slower (their
    # clocks after heavy work: nothing moved between them), rank 1 12% slower, rank 1 4%
    # faster, rank 1's check failed
    res = _run_place({"profiles": inputs["profiles"], "trace": inputs["trace"], "reprofile_every": 1,
                      "speed_tolerance": 0.05}, switches=["recalibrate"] * 5,
                     speeds=[1.0, 1.01, (1.1, 1.1), 1.12, 0.96, "CUDA error: out of memory"])
    for r in res:  # every rank takes the same decision from the gathered ratios
        reps = [s["report"] for s in r["switches"]]
        assert all(rep is not None for rep in reps), reps
        assert [rep["profiled"] for rep in reps] == [False, False, True, False, True]
        assert r["profiled"] == [True, True]  # quick profiles after the 3rd and the 5th check
        assert [rep["speed_ratios"] for rep in reps[:4]] == [[1.0, 1.01], [1.1, 1.1], [1.0, 1.12],
                                                             [1.0, 0.96]]
        assert [rep["speed_relative"][1] for rep in reps[:4]] == [1.01, 1.0, 1.12, 0.96]
        assert reps[2]["speed_relative"][0] == round(1 / 1.12, 4)
        assert all(rep["speed_sm_mhz"] == [[1500.0, 1500.0], [1501.0, 1501.0]] for rep in reps[:4])
        assert reps[4]["speed_sm_mhz"] == [[1500.0, 1500.0], None]  # rank 1's check failed
        assert np.isnan(reps[4]["speed_ratios"][1]) and np.isnan(reps[4]["speed_relative"]).all()
        assert reps[4]["speed_errors"] == ["rank 1: RuntimeError: CUDA error: out of memory"]
        assert all("speed_errors" not in rep for rep in reps[:4])
        assert r["holds"]


@pytest.mark.parametrize("speed, source", [
    (1.03, "files"),  # within speed_tolerance: the files are planned with, nothing measured
    (0.88, "calibration (files off by more than speed_tolerance)"),  # a stale file: calibrate
    ("CUDA error: out of memory", "files"),  # no check: the files, as they are
])
def test_profile_files_are_checked_against_the_gpus_at_start(inputs, speed, source):
    res = _run_place({"profiles": inputs["profiles"], "trace": inputs["trace"]}, speeds=[speed])
    for r in res:
        rep = r["report"]
        assert rep["applied"] and rep["profiles_from"] == source and r["holds"]
        assert r["profiled"] == ([False] if source.startswith("calibration") else [])  # full profiles
        if isinstance(speed, float):
            assert rep["speed_ratios"] == [1.0, speed] and "speed_errors" not in rep
            assert rep["speed_relative"] == [round(1 / speed, 4), speed]
        else:
            assert rep["speed_errors"] == [f"rank 1: RuntimeError: {speed}"]


def test_recalibration_plans_in_the_background_and_applies_at_the_due_step(inputs):
    res = _run_place({"profiles": inputs["profiles"], "trace": inputs["trace"], "plan_delay_steps": 5,
                      "min_gain": -1.0}, switches=["recalibrate"])
    for r in res:  # the helper checked: None at first, one report exactly 5 steps later
        rep = r["switches"][0]["report"]
        assert rep["reason"] == "recalibration" and rep["waited_seconds"] >= 0
        assert rep["plan_delay_steps"] == 4  # 5 asked, at most half the 8-step interval
        assert rep["planning_wall_seconds"] > 0 or r is not res[0]  # rank 0 planned
        assert rep["total_seconds"] < 1.0 and r["holds"]
        assert rep["plan_threads"] == 1  # beside serving: one planning thread
    assert res[0]["switches"][0]["map"].equal(res[1]["switches"][0]["map"])


def test_a_background_planning_that_fails_or_hangs_keeps_the_placement(inputs):
    res = _run_place({"profiles": inputs["profiles"], "trace": inputs["trace"], "plan_delay_steps": 2},
                     switches=["recalibrate-fails"])  # its planner raises while planning
    for r in res:  # the failure reached every rank through the broadcast: one warning, no move
        assert r["switches"][0]["report"] is None and r["holds"]  # a plan that ran reports a dict
        assert r["switches"][0]["map"].equal(r["start_map"])
    import threading

    from vllm_gem.vllm.background import PendingPlan, PlanJob
    release = threading.Event()
    stuck = PendingPlan(PlanJob(lambda: (release.wait(), (None, ""))[1], np.zeros((1, 2))),
                        {}, "gem-migrate", started_step=0, due_step=5, stall_seconds=0.0)
    assert stuck.wait(limit_s=0.05) == (None, "planning (gem-migrate) was not done 0.05 s after its "
                                              "due step; the placement in use stays")
    release.set()
    from vllm_gem.vllm.background import next_delay  # serving waited 0.05 s: more steps next time
    assert next_delay(200, stuck.waited_seconds) == 400 and next_delay(200, 0.0) == 200


def test_a_switch_while_a_recalibration_plans_drops_that_plan(inputs):
    res = _run_place({"profiles": inputs["profiles"], "trace": inputs["trace"], "plan_delay_steps": 3,
                      "min_gain": -1.0}, switches=["recalibrate+switch"])
    initial = np.tile(np.arange(24) % 16, (3, 1)).tolist()
    for r in res:
        rep = r["switches"][0]["report"]
        assert rep["applied"] is False and rep["why"] == "the map changed while planning; the plan is dropped"
        assert r["switches"][0]["map"].tolist() == initial and r["holds"]  # the switch's map stays


def test_recalibration_with_data_parallelism_sums_every_ranks_routing(inputs):
    # each DP rank routes its own tokens: the history is a collective that every rank joins
    # (if rank 0 entered it alone, the other rank would wait in another collective forever)
    res = _run_place({"profiles": inputs["profiles"], "trace": inputs["trace"], "plan_delay_steps": 2},
                     switches=["recalibrate"], dp=2)
    for r in res:
        assert r["switches"][0]["report"] is not None and r["holds"]
    live = [h for h in res[0]["histories"] if h.shape[0] == 8]
    mine, theirs = res[0]["recorded"], res[1]["recorded"]  # rank 1 routed twice rank 0's tokens
    idle = lambda c: [i for i in range(8) if c[i].sum() == 0]  # noqa: E731
    assert idle(mine) == [1, 5] and idle(theirs) == [2, 6]  # their dummy batches
    assert theirs[0].equal(2 * mine[0]) and mine.sum() > 0
    assert len(live) == 1 and live[0].equal(mine + theirs)  # summed step by step, none idle in both
    assert [h.shape[0] for h in res[1]["histories"]] == [8]  # rank 1 joined for the live one only
    assert live[0][1].equal(theirs[1]) and live[0][2].equal(mine[2])  # not shifted by idle steps


def test_profile_files_of_other_gpus_keep_vllm_placement_or_fail_in_strict(inputs, tmp_path):
    files = []
    for r, (uuid, slow) in enumerate((("GPU-aaaa", 1.0), ("GPU-bbbb", 1.3))):
        prof = example_profile(f"gpu{r}", slow, num_experts=12)
        prof.gpu.uuid, prof.gpu.index = uuid, r
        files.append(str(save(prof, tmp_path / f"gpu{r}.json")))
    cfg = {"profiles": files, "trace": inputs["trace"]}
    res = _run_place(cfg, gpu_uuids=["GPU-aaaa", "GPU-bbbb"])  # the GPUs they were measured on
    assert all(r["report"].get("applied") for r in res), [r["report"] for r in res]
    res = _run_place(cfg, gpu_uuids=["GPU-aaaa", "GPU-cccc"])  # rank 1's file is of another GPU
    for r in res:  # every rank says the same, no move
        assert r["report"]["applied"] is False and r["holds"]
        assert r["report"]["why"] == (
            f"GemInputError: {files[1]}: gpu.uuid: is GPU-bbbb (gpu1 #1) (EP rank 1; problems found on "
            "rank(s) 1); expected the GPU of EP rank 1, GPU-cccc: its own profile (`vllm-gem calibrate` "
            "on this host), or no gem.profiles, to calibrate at start")
    res = _run_place({**cfg, "strict": True}, gpu_uuids=["GPU-dddd", "GPU-cccc"])
    for r in res:
        assert r["report"]["raised"].startswith(f"GemInputError: {files[0]}: gpu.uuid: is GPU-aaaa")
        assert "(EP rank 0; problems found on rank(s) 0, 1)" in r["report"]["raised"]
    res = _run_place(cfg, gpu_uuids=["GPU-aaaa", "GPU-bbbb"], missing_on_rank=1)  # one node lacks them
    for r in res:  # no rank is left waiting: both say what rank 1 found
        assert r["report"]["why"] == (f"GemInputError: {files[0]}.not-here: file: does not exist "
                                      "(EP rank 1; problems found on rank(s) 1); expected a readable file")


def test_a_trace_of_another_model_keeps_vllm_placement_or_fails_in_strict(inputs):
    cfg = {"profiles": inputs["profiles"], "trace": inputs["wrong"]}
    res = _run_place(cfg)
    for r in res:  # every rank takes the same branch: no move, one clear reason
        assert r["report"]["applied"] is False and r["holds"]
        assert "wrong.msgpack: counts.shape: is 3 layers x 60 experts" in r["report"]["why"]
        assert r["map"].tolist() == np.tile(np.arange(24) % 16, (3, 1)).tolist()
    res = _run_place({**cfg, "strict": True})
    assert all(r["report"]["raised"].startswith("PlacementError: planning on EP rank 0 failed: ")
               for r in res)


def test_a_rank_where_gem_did_not_attach_stops_the_others_without_a_hang(inputs):
    res = _run_place({"profiles": inputs["profiles"], "trace": inputs["trace"]}, inactive_rank=1)
    for r in res:
        assert r["report"] == {"applied": False, "why": "rank 1: GEM is not active on this worker"}
        assert r["holds"]


def test_a_calibration_failing_on_one_rank_is_named_on_every_rank(inputs):
    res = _run_place({"trace": inputs["trace"]}, fail_rank=1)
    for r in res:
        assert r["report"]["applied"] is False and r["holds"]
        assert r["report"]["why"].startswith("CalibrationError: calibration failed on rank 1: ")
        assert "illegal memory access" in r["report"]["why"]


def test_lost_weights_are_reported_by_every_rank_and_stop_the_engine_even_without_strict(inputs):
    res = _run_place({"profiles": inputs["profiles"], "trace": inputs["trace"]}, lose=True)
    for r in res:
        assert r["report"]["applied"] is False, r["report"]
        assert "no intact copy is left" in r["report"]["weights_lost"]

    from vllm_gem.vllm import engine
    core = types.SimpleNamespace(
        vllm_config=types.SimpleNamespace(additional_config={"gem": {"trace": inputs["trace"]}}),
        collective_rpc=lambda fn: [r["report"] for r in res])
    with pytest.raises(RuntimeError, match="vllm-gem: .*no intact copy is left"):
        engine.place_before_serving(core)


# ---------------------------------------------------------------- recorder, replay, metrics
def test_recorder_folds_physical_counts_into_logical_steps():
    import torch

    from vllm_gem.vllm.recorder import RoutingRecorder
    rec = RoutingRecorder(num_layers=2, num_logical=3, capacity=4, device=torch.device("cpu"))
    p2l = torch.tensor([[0, 1, 2, 0], [2, 2, 1, 0]])
    for step in range(6):
        rec.record(torch.full((2, 4), step, dtype=torch.int32), p2l)
    hist = rec.history()
    assert rec.overflowed and hist.shape == (4, 2, 3)  # step 0 held no tokens and is gone anyway
    np.testing.assert_array_equal(hist[0], [[4, 2, 2], [2, 2, 4]])  # step 2: replicas summed
    np.testing.assert_array_equal(hist[-1], [[10, 5, 5], [5, 5, 10]])
    tr = rec.trace("test")
    assert tr.shape == (4, 2, 3) and tr.params["overflowed"]
    rec.record_idle()  # a dummy batch: a row of its own, dropped unless kept
    assert rec.history(2).shape == (1, 2, 3) and rec.history(2, keep_idle=True).shape == (2, 2, 3)
    assert rec.history(2, keep_idle=True)[-1].sum() == 0 and rec.steps == 7


def test_trace_replay_draws_distinct_experts_in_proportion():
    import torch

    from vllm_gem.vllm.routing import sample_topk, step_log_probs
    counts = np.zeros((1, 1, 8))
    counts[0, 0] = [800, 400, 200, 100, 50, 25, 0, 0]
    logp = torch.from_numpy(step_log_probs(counts)[0])
    gen = torch.Generator().manual_seed(0)
    w, ids = sample_topk(logp, 20000, 1, gen)
    freq = np.bincount(ids.numpy().ravel(), minlength=8) / 20000
    np.testing.assert_allclose(freq[:6], counts[0, 0, :6] / 1575, atol=0.02)
    w, ids = sample_topk(logp, 500, 4, gen)
    assert all(len(set(row)) == 4 for row in ids.tolist()) and torch.allclose(w.sum(1), torch.ones(500))


def test_trace_replay_in_recorded_order_takes_one_step_per_forward_pass(tmp_path):
    import torch

    from vllm_gem.vllm.routing import TraceReplayRouting
    steps, layers, experts = 5, 3, 8
    counts = np.zeros((steps, layers, experts), np.int32)
    hot = np.arange(steps * layers).reshape(steps, layers) % experts  # one hot expert per step, layer
    np.put_along_axis(counts, hot[..., None], 10**6, axis=2)
    path = tmp_path / "t.msgpack"
    save(RoutingTrace(model="m", source="t", counts=NdArray.from_numpy(counts)), path)
    r = TraceReplayRouting(str(path), "recorded")
    drawn = [[int(r.route_layer(layer, torch.zeros(64, 2), torch.zeros(64, experts), 1, None)[1]
                  .flatten().mode().values) for layer in range(layers)] for _ in range(2 * steps)]
    assert drawn == np.concatenate([hot, hot]).tolist()  # step after step, then again from the first
    with pytest.raises(GemInputError, match="VLLM_GEM_ROUTING_ORDER: value: is 'sorted'"):
        TraceReplayRouting(str(path), "sorted")


def test_metrics_collector_reads_rank_states(tmp_path):
    from vllm_gem.vllm.metrics import GemCollector, RankState, write_state
    for r, us in [(0, 101.0), (1, 99.5)]:
        write_state(str(tmp_path), RankState(rank=r, generation=1, predicted_layer_us=us,
                                             predicted_layer_us_before=120.0, straggler_ratio=1.01))
    (tmp_path / "rank7.json").write_text("{broken")
    fams = {f.name: f for f in GemCollector(str(tmp_path)).collect()}
    samples = {s.labels["rank"]: s.value for s in fams["vllm_gem:predicted_moe_layer_time_seconds"].samples}
    assert samples == pytest.approx({"0": 101.0e-6, "1": 99.5e-6})  # kept in us, exposed in seconds
    assert fams["vllm_gem:placements"].type == "counter"
    assert fams["vllm_gem:placements"].samples[0].name == "vllm_gem:placements_total"
    assert fams["vllm_gem:placements"].samples[0].value == 1


def test_trace_replay_rejects_a_trace_of_another_width(tmp_path):
    import torch

    from vllm_gem.vllm.routing import TraceReplayRouting
    path = tmp_path / "t.msgpack"
    save(RoutingTrace(model="m", source="t", counts=NdArray.from_numpy(np.ones((2, 3, 8), np.int32))), path)
    r = TraceReplayRouting(str(path))
    with pytest.raises(GemInputError, match="has 8 experts per layer; expected the model's 16"):
        r.route_layer(0, torch.zeros(4, 2), torch.zeros(4, 16), 2, None)


def test_recorder_switch_reads_text_from_http_and_booleans(monkeypatch):
    from vllm_gem.vllm import entry
    from vllm_gem.vllm.config import parse
    cfg = parse({})
    monkeypatch.setattr(entry, "_WORKER", types.SimpleNamespace(ctx=types.SimpleNamespace(cfg=cfg)))
    assert entry.set_recording(None, "False") == {"recording": False} and not cfg.record
    assert entry.set_recording(None, " On ") == {"recording": True} and cfg.record
    assert entry.set_recording(None, False) == {"recording": False}
    monkeypatch.setattr(entry, "_WORKER", None)
    assert entry.set_recording(None, "true")["recording"] is False  # GEM not active here


def test_routing_drift_relabels_the_replayed_experts_in_place_at_step_multiples(tmp_path, monkeypatch):
    import torch

    from vllm_gem.vllm import routing
    counts = np.zeros((2, 1, 6), np.int32)
    counts[:, 0] = [600, 300, 100, 0, 0, 0]
    path = tmp_path / "t.msgpack"
    save(RoutingTrace(model="m", source="t", counts=NdArray.from_numpy(counts)), path)
    r = routing.TraceReplayRouting(str(path))
    r.route_layer(0, torch.zeros(3, 2), torch.zeros(3, 6), 2, None)  # the device copy now exists
    device_logp = next(iter(r._device_logp.values()))
    before = device_logp.clone()
    monkeypatch.setattr(routing, "_ACTIVE", r)
    assert not routing.maybe_drift(7, 5) and torch.equal(device_logp, before)
    assert routing.maybe_drift(10, 5)
    perm = np.random.default_rng(0).permutation(6)
    assert torch.equal(device_logp, before[..., torch.from_numpy(perm)])  # same tensor, new contents
    hot = int(np.argmax(r.logp_host[0, 0]))
    assert perm[hot] == 0  # the expert that took over expert 0's share
    monkeypatch.setenv(routing.DRIFT_ENV, "soon")
    with pytest.raises(GemInputError, match="VLLM_GEM_ROUTING_DRIFT_STEPS"):
        routing.drift_steps()
    monkeypatch.setenv(routing.DRIFT_ENV, "3000")
    assert routing.drift_steps() == 3000


def test_re_profiles_time_the_served_layers_own_experts(monkeypatch):
    """No weight-sized copies while serving: experts on the worker's device in the served
    precision are timed in place; others (another dtype, elsewhere) fall back to random weights
    (fp8 layouts: tests/test_fp8.py)."""
    import torch

    from vllm_gem.vllm import gpu_profiles
    from vllm_gem.vllm.config import GemConfig
    seen = []
    monkeypatch.setattr(gpu_profiles, "calibrate_device", lambda dev, spec, weights=None: seen.append(weights))
    w13, w2 = torch.zeros(4, 2 * 8, 16, dtype=torch.bfloat16), torch.zeros(4, 16, 8, dtype=torch.bfloat16)
    moe = types.SimpleNamespace(w13_weight=w13, w2_weight=w2)
    model = types.SimpleNamespace(modules=lambda: [moe])
    ctx = types.SimpleNamespace(cfg=GemConfig(), rank=0, hidden=16, intermediate=8, local_experts=4,
                                device=torch.device("cpu"), model=model, precision="bf16")
    gpus = gpu_profiles.GpuProfiles(ctx)  # a part alone, with only the context it reads
    gpus.local_profile(quick=True)
    assert seen[-1][0] is w13 and seen[-1][1] is w2
    moe.w13_weight, moe.w2_weight = w13.float(), w2.float()  # e.g. not bf16: random weights instead
    gpus.local_profile(quick=True)
    assert seen[-1] is None


def test_the_grafana_dashboard_queries_only_metrics_the_plugin_exports():
    import re

    from vllm_gem.vllm.metrics import METRICS, RankState, exposed_name
    exported = {exposed_name(name, kind) for _, name, kind, _ in METRICS}
    counters = {exposed_name(name, kind) for _, name, kind, _ in METRICS if kind == "counter"}
    assert {attr for attr, _, _, _ in METRICS} <= set(RankState.__struct_fields__)  # every series has data
    queried = set()
    for expr in dashboard_queries():
        names = set(re.findall(r"vllm_gem:[a-z_]+", expr))
        assert names, expr
        queried |= names
        # rate() and increase() only make sense on counters
        for fn, name in re.findall(r"\b(rate|increase|irate)\((vllm_gem:[a-z_]+)", expr):
            assert name in counters, f"{fn}() of {name}, which is not a counter: {expr}"
    assert queried <= exported, queried - exported
    # what an operator looks at: per-rank layer time, straggler ratio, recalibrations, moves
    assert {"vllm_gem:predicted_moe_layer_time_seconds", "vllm_gem:straggler_ratio",
            "vllm_gem:recalibrations_total", "vllm_gem:placements_total"} <= queried


def dashboard_queries() -> list[str]:
    dash = json.loads((Path(__file__).parents[1] / "docs" / "grafana-vllm-gem.json").read_text())
    out = []
    for panel in dash["panels"]:
        assert panel["targets"], panel["title"]
        out += [t["expr"] for t in panel["targets"]]
    return out + [v["query"] if isinstance(v.get("query"), str) else v["query"]["query"]
                  for v in dash.get("templating", {}).get("list", []) if v.get("type") == "query"]


PROMTOOL = __import__("shutil").which("promtool")


@pytest.mark.skipif(not PROMTOOL, reason="promtool not installed (Debian package prometheus; README's set-up)")
def test_promtool_accepts_every_dashboard_query_and_the_exported_metrics(tmp_path):
    import subprocess

    from vllm_gem.vllm.metrics import METRICS, GemCollector, RankState, exposed_name, write_state
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"gem:q{i}", "expr": expr.replace("$job", ".*")} for i, expr in enumerate(dashboard_queries())
        if "label_values" not in expr]}]}
    (tmp_path / "rules.json").write_text(json.dumps(rules))  # YAML is a superset of JSON
    r = subprocess.run([PROMTOOL, "check", "rules", str(tmp_path / "rules.json")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    from prometheus_client import CollectorRegistry, generate_latest
    write_state(str(tmp_path), RankState(rank=0, generation=2, predicted_layer_us=101.0,
                                         predicted_layer_us_before=120.0, straggler_ratio=1.01,
                                         recorded_steps=5, recalibrations=1))
    registry = CollectorRegistry()
    registry.register(GemCollector(str(tmp_path)))
    r = subprocess.run([PROMTOOL, "check", "metrics"], input=generate_latest(registry).decode(), capture_output=True,
                       text=True)
    lines = (r.stdout + r.stderr).strip().splitlines()
    # the only lint: a ':' in the name, vLLM's own naming (vllm:*) that vllm_gem:* follows
    # (docs/plugin.md); nothing about types, units or suffixes
    assert lines and all(line.endswith("metric names should not contain ':'") for line in lines), lines
    assert {line.split()[0] for line in lines} == {exposed_name(n, k) for _, n, k, _ in METRICS}


def test_attach_builds_the_worker_from_its_parts_and_hooks_the_eplb_step(monkeypatch):
    """entry.attach on a loaded vLLM worker (a stand-in with vLLM's attribute names): one
    GemWorker whose parts share one context and progress, the EPLB step recording and
    counting steps; a model runner without EPLB state leaves GEM off with the reason."""
    import torch
    from vllm.distributed import parallel_state

    from vllm_gem.vllm import entry
    ms = types.SimpleNamespace(model=types.SimpleNamespace(num_moe_layers=2, num_logical_experts=4,
                                                           modules=lambda: []),
                               physical_to_logical_map=torch.arange(4).repeat(2, 1),
                               expert_load_pass=torch.ones(2, 4, dtype=torch.int64))
    ep = types.SimpleNamespace(rank_in_group=0, world_size=1, ranks=[0], cpu_group=None)
    monkeypatch.setattr(parallel_state, "get_ep_group", lambda: ep)
    monkeypatch.setattr("vllm_gem.vllm.context.expert_shape", lambda model: (16, 8, 4))
    monkeypatch.setattr("vllm_gem.vllm.context.served_precision", lambda model: "bf16")
    stepped = []
    eplb = types.SimpleNamespace(model_states={"m": ms}, step=lambda **kw: stepped.append(kw))
    vcfg = types.SimpleNamespace(additional_config={"gem": {"place": False}},
                                 parallel_config=types.SimpleNamespace(data_parallel_size=1),
                                 model_config=types.SimpleNamespace(model="fake-moe"))
    worker = types.SimpleNamespace(model_runner=types.SimpleNamespace(eplb_state=eplb), vllm_config=vcfg)
    monkeypatch.setattr(entry, "_WORKER", None)
    monkeypatch.setattr(entry, "gather_objects", lambda obj, group: [obj])  # one rank: no process group
    entry.attach(worker)
    w = entry.current()
    assert w is not None and w.ctx.rank == 0 and w.ctx.model_name == "fake-moe"
    assert w.placer.ctx is w.ctx is w.gpus.ctx is w.recalibration.ctx
    assert w.placer.progress is w.progress is w.recalibration.progress and w.placer.gpus is w.gpus
    eplb.step()
    eplb.step(is_dummy=True)
    assert len(stepped) == 2 and w.progress.steps == 2 and w.recorder.steps == 2
    assert entry.place_at_start(None) == {"applied": False, "why": "place=false: recording only"}
    assert w.progress.started
    worker.model_runner.eplb_state = None
    entry.attach(worker)  # not strict: one warning, GEM off on this worker
    assert entry.current() is None
