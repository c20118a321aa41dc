"""Placement: which node, devices and ports each instance gets. Pure and deterministic.

Every rank of the launch computes the same plan from the same config; rank r plays node r.
Rules:
- an instance with TP <= devices per node takes a disjoint block of TP devices; a node holds
  devices // TP of them; TP > devices per node spans TP // devices whole nodes;
- each model gets its own nodes (models never share a node), so nodes needed is the sum
  over models;
- HTTP port of instance i is port_start + i, in model order;
- internal vLLM ports come from a per-slot block, so co-located instances never collide.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Config
from .platforms import Platform

INTERNAL_PORTS_PER_SLOT = 16


@dataclass(frozen=True)
class Instance:
    id: int
    model_index: int
    model: str  # model name (HF id)
    served_name: str
    nodes: tuple[int, ...]  # node indices; nodes[0] is the head (multi-node when > 1)
    devices: tuple[int, ...]  # device ids used on each of its nodes
    slot: int  # position among the instances on its head node
    port: int
    internal_port_base: int  # VLLM_PORT; MASTER_PORT = base + 1; block of INTERNAL_PORTS_PER_SLOT

    @property
    def vllm_port(self) -> int:
        return self.internal_port_base

    @property
    def master_port(self) -> int:
        return self.internal_port_base + 1


@dataclass(frozen=True)
class Plan:
    instances: tuple[Instance, ...]
    nodes_needed: int
    devices_per_node: int

    def on_node(self, node: int) -> list[Instance]:
        """Instances with a process on `node` (head or worker of a multi-node instance)."""
        return [i for i in self.instances if node in i.nodes]


def instances_per_node(tp: int, devices_per_node: int) -> int:
    return max(1, devices_per_node // tp)


def nodes_per_instance(tp: int, devices_per_node: int) -> int:
    return -(-tp // devices_per_node)


def make_plan(config: Config, platform: Platform) -> Plan:
    dpn = platform.devices_per_node
    instances: list[Instance] = []
    next_node = 0
    for model_index, model in enumerate(config.models):
        tp = model.tensor_parallel_size
        span = nodes_per_instance(tp, dpn)
        per_node = instances_per_node(tp, dpn) if span == 1 else 1
        for k in range(model.instances):
            slot = k % per_node if span == 1 else 0
            head = next_node + (k // per_node) * span
            devices = tuple(range(slot * tp, slot * tp + tp)) if span == 1 else tuple(range(dpn))
            iid = len(instances)
            instances.append(
                Instance(
                    id=iid,
                    model_index=model_index,
                    model=model.name,
                    served_name=model.served_name,
                    nodes=tuple(range(head, head + span)),
                    devices=devices,
                    slot=slot,
                    port=config.port_start + iid,
                    internal_port_base=config.internal_port_start + slot * INTERNAL_PORTS_PER_SLOT,
                )
            )
        next_node += -(-model.instances // per_node) * span
    return Plan(instances=tuple(instances), nodes_needed=next_node, devices_per_node=dpn)
