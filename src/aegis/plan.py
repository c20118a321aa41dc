"""Placement: which node, devices and ports each instance gets. Pure and deterministic.

Every rank of the launch computes the same plan from the same config; rank r plays node r.
Rules:
- an instance with TP <= devices per node takes a disjoint block of TP devices; a node holds
  devices // TP of them. Instances fill the current node in order; when the next one does not
  fit, a new node is opened. So models share a node only when the next model's instance fits
  in what the previous one left free (70B TP 6 + 8B TP 1 x 6 -> one Aurora node);
- TP > devices per node (a multiple of it, see config) spans TP // devices whole fresh nodes;
- nodes needed is the number of nodes opened;
- HTTP port of instance i is port_start + i, in model order; then one port per router;
- internal vLLM ports come from a per-slot block (slot = position on its head node), so
  co-located instances never collide.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from .config import INTERNAL_PORTS_PER_SLOT, MAX_NODES, Config, nodes_per_instance
from .platforms import Platform


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

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id, "model_index": self.model_index, "model": self.model,
            "served_name": self.served_name, "nodes": list(self.nodes),
            "devices": list(self.devices), "slot": self.slot, "port": self.port,
            "vllm_port": self.vllm_port, "master_port": self.master_port,
        }


@dataclass(frozen=True)
class Plan:
    instances: tuple[Instance, ...]
    nodes_needed: int
    devices_per_node: int
    # served model name -> its router's port (on the first node), after the instances' ports
    router_ports: dict[str, int] = field(default_factory=dict)

    @cached_property
    def _by_node(self) -> dict[int, list[Instance]]:
        index: dict[int, list[Instance]] = {}
        for inst in self.instances:
            for node in inst.nodes:
                index.setdefault(node, []).append(inst)
        return index

    def on_node(self, node: int) -> list[Instance]:
        """Instances with a process on `node` (head or worker of a multi-node instance)."""
        return list(self._by_node.get(node, ()))


    def to_dict(self) -> dict[str, Any]:
        return {"nodes_needed": self.nodes_needed, "devices_per_node": self.devices_per_node,
                "instances": [i.to_dict() for i in self.instances]}


def make_plan(config: Config, platform: Platform) -> Plan:
    dpn = platform.devices_per_node
    instances: list[Instance] = []
    nodes_opened = 0
    open_node, used_devices, slots_used = -1, dpn, 0  # no partly filled node yet

    def add(model_index: int, nodes: tuple[int, ...], devices: tuple[int, ...], slot: int) -> None:
        iid = len(instances)
        model = config.models[model_index]
        instances.append(Instance(
            id=iid, model_index=model_index, model=model.name, served_name=model.served_name,
            nodes=nodes, devices=devices, slot=slot, port=config.first_port + iid,
            internal_port_base=config.internal_port_start + slot * INTERNAL_PORTS_PER_SLOT))

    for model_index, model in enumerate(config.models):
        tp = model.tensor_parallel_size
        span = nodes_per_instance(tp, dpn)
        for _ in range(model.instances):
            if span > 1:  # whole fresh nodes; a partly filled node stays open for later models
                add(model_index, tuple(range(nodes_opened, nodes_opened + span)),
                    tuple(range(dpn)), 0)
                nodes_opened += span
                continue
            if used_devices + tp > dpn:
                open_node, used_devices, slots_used = nodes_opened, 0, 0
                nodes_opened += 1
            add(model_index, (open_node,), tuple(range(used_devices, used_devices + tp)),
                slots_used)
            used_devices += tp
            slots_used += 1
    after = config.first_port + len(instances)
    return Plan(instances=tuple(instances), nodes_needed=nodes_opened, devices_per_node=dpn,
                router_ports={m: after + k for k, m in enumerate(config.routed_models)})
