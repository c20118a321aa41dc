"""Placement rules, ports and determinism of aegis.plan."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from aegis.config import from_mapping
from aegis.plan import INTERNAL_PORTS_PER_SLOT, make_plan
from aegis.platforms import get_platform

AURORA = get_platform("aurora")
FRONTIER = get_platform("frontier")


def plan_of(models, platform=AURORA, **extra):
    config = from_mapping({"models": models, "platform": platform.name, **extra})
    return config, make_plan(config, platform)


def test_single_70b_tp6_two_instances_share_one_aurora_node():
    _, plan = plan_of([{"model": "70B", "instances": 2, "tensor_parallel_size": 6}])
    assert plan.nodes_needed == 1
    assert [(i.nodes, i.devices, i.port) for i in plan.instances] == [
        ((0,), (0, 1, 2, 3, 4, 5), 8000), ((0,), (6, 7, 8, 9, 10, 11), 8001)]
    assert [i.slot for i in plan.instances] == [0, 1]
    assert [(i.vllm_port, i.master_port) for i in plan.instances] == [(30000, 30001),
                                                                     (30016, 30017)]


def test_multi_model_ports_are_sequential_across_models():
    _, plan = plan_of([{"model": "70B", "instances": 2, "tensor_parallel_size": 6},
                       {"model": "8B", "instances": 1}])
    assert [(i.model, i.port, i.nodes) for i in plan.instances] == [
        ("70B", 8000, (0,)), ("70B", 8001, (0,)), ("8B", 8002, (1,))]
    assert plan.nodes_needed == 2


def test_models_share_a_node_only_when_the_next_fits():
    _, plan = plan_of([{"model": "70B", "tensor_parallel_size": 6},
                       {"model": "8B", "instances": 7}])
    assert [i.nodes[0] for i in plan.instances] == [0, 0, 0, 0, 0, 0, 0, 1]
    assert plan.instances[1].devices == (6,)
    assert plan.instances[-1].devices == (0,)
    assert plan.nodes_needed == 2


def test_tp_over_devices_spans_whole_nodes():
    _, plan = plan_of([{"model": "120B", "instances": 2, "tensor_parallel_size": 24},
                       {"model": "8B", "instances": 1}])
    assert plan.instances[0].nodes == (0, 1) and plan.instances[1].nodes == (2, 3)
    assert plan.instances[0].devices == tuple(range(12))
    assert plan.instances[2].nodes == (4,)
    assert plan.nodes_needed == 5
    assert [i.id for i in plan.on_node(1)] == [0]


def test_leftover_devices_are_not_split_across_nodes():
    _, plan = plan_of([{"model": "m", "instances": 3, "tensor_parallel_size": 5}])
    assert [(i.nodes, i.devices) for i in plan.instances] == [
        ((0,), (0, 1, 2, 3, 4)), ((0,), (5, 6, 7, 8, 9)), ((1,), (0, 1, 2, 3, 4))]


def test_frontier_packs_eight_gcds():
    _, plan = plan_of([{"model": "8B", "instances": 9}], FRONTIER)
    assert plan.nodes_needed == 2 and len(plan.on_node(0)) == 8 and len(plan.on_node(1)) == 1


def test_same_config_same_plan():
    models = [{"model": "a", "instances": 5, "tensor_parallel_size": 3},
              {"model": "b", "instances": 2, "tensor_parallel_size": 12}]
    config, first = plan_of(models)
    assert make_plan(config, AURORA) == first
    assert make_plan(from_mapping(config.to_mapping()), AURORA) == first


model_strategy = st.fixed_dictionaries({
    "model": st.sampled_from(["a", "b", "c"]),
    "instances": st.integers(1, 30),
    "tensor_parallel_size": st.one_of(st.integers(1, 12), st.sampled_from([24, 36])),
})


@settings(max_examples=200, deadline=None)
@given(models=st.lists(model_strategy, min_size=1, max_size=4))
def test_placement_invariants(models):
    config, plan = plan_of(models)
    dpn = AURORA.devices_per_node
    assert len(plan.instances) == sum(m["instances"] for m in models)
    assert [i.port for i in plan.instances] == list(range(8000, 8000 + len(plan.instances)))
    used_nodes = set()
    for node in range(plan.nodes_needed):
        here = plan.on_node(node)
        assert here, f"node {node} is empty"
        used_nodes.add(node)
        devices = [d for inst in here for d in inst.devices]
        assert len(devices) == len(set(devices)) and all(0 <= d < dpn for d in devices)
        heads = [inst for inst in here if inst.nodes[0] == node]
        slots = [inst.slot for inst in heads]
        assert slots == list(range(len(slots)))
        blocks = [inst.internal_port_base for inst in heads]
        assert len(set(blocks)) == len(blocks)
        assert all(b + INTERNAL_PORTS_PER_SLOT <= 30000 + dpn * INTERNAL_PORTS_PER_SLOT
                   for b in blocks)
    for inst in plan.instances:
        tp = config.models[inst.model_index].tensor_parallel_size
        assert len(inst.devices) * len(inst.nodes) == tp
        assert inst.nodes == tuple(range(inst.nodes[0], inst.nodes[0] + len(inst.nodes)))
    # Never more nodes than giving every model its own nodes (the pre-packing rule).
    separate = sum(-(-m["instances"] // max(1, dpn // m["tensor_parallel_size"]))
                   if m["tensor_parallel_size"] <= dpn
                   else m["instances"] * m["tensor_parallel_size"] // dpn for m in models)
    assert plan.nodes_needed <= separate
    assert used_nodes == set(range(plan.nodes_needed))
