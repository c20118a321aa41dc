"""Site serving addresses: each platform's form, and where the address goes (bind address,
VLLM_HOST_IP, the rendezvous address, the endpoints file)."""

import pytest

from aegis.config import from_mapping
from aegis.launch.addresses import check_form, host_ip, interface_ipv4, serving_address
from aegis.launch.instances import build_part
from aegis.launch.supervise import LocalFleet
from aegis.plan import make_plan
from aegis.platforms import PLATFORMS, get_platform, platform_names


def test_every_platform_record_has_a_valid_address_form():
    for name in platform_names():
        assert check_form(get_platform(name).address) is None, name


@pytest.mark.parametrize("platform, host, expected", [
    # PBS_NODEFILE on Aurora lists management names; the HSN name shares the first label.
    ("aurora", "x4000c0s0b0n0.hostmgmt2000.cm.aurora.alcf.anl.gov",
     "x4000c0s0b0n0.hsn.cm.aurora.alcf.anl.gov"),
    ("aurora", "x4000c0s0b0n0", "x4000c0s0b0n0.hsn.cm.aurora.alcf.anl.gov"),
    ("polaris", "x3006c0s13b1n0.hsn.cm.polaris.alcf.anl.gov",
     "x3006c0s13b1n0.hsn.cm.polaris.alcf.anl.gov"),
    ("frontier", "frontier00042", "frontier00042"),
    ("local", "127.0.0.1", "127.0.0.1"),
])
def test_serving_address_per_platform(platform, host, expected):
    assert serving_address(get_platform(platform).address, host) == expected


def test_interface_form_reads_the_interface_on_the_node():
    asked = []
    got = serving_address("interface:hsn0", "nid001", lambda name: asked.append(name) or "10.1.2.3")
    assert (got, asked) == ("10.1.2.3", ["hsn0"])
    assert interface_ipv4("lo") == "127.0.0.1"  # the real lookup, on this machine
    with pytest.raises(OSError, match="interface no-such-if0"):
        interface_ipv4("no-such-if0")


@pytest.mark.parametrize("form, problem", [
    ("{hostname}.x", "unknown field"), ("{host", "{host"), ("interface:", "needs a name")])
def test_bad_forms_are_named(form, problem):
    assert problem in check_form(form)


def test_host_ip_resolves_or_keeps_the_name():
    assert host_ip("localhost") == "127.0.0.1"
    assert host_ip("no-such-host.invalid") == "no-such-host.invalid"


def test_aurora_instances_serve_on_the_hsn_name_and_export_its_ip():
    config = from_mapping({"model": "big/405B", "tensor_parallel_size": 24})
    platform = PLATFORMS["aurora"]
    plan = make_plan(config, platform)
    hosts = ["x1.hostmgmt.cm.aurora.alcf.anl.gov", "x2.hostmgmt.cm.aurora.alcf.anl.gov"]
    addresses = [serving_address(platform.address, h) for h in hosts]
    ips = ["10.0.0.1", "10.0.0.2"]
    head, worker = (build_part(instance=plan.instances[0], model=config.models[0], config=config,
                               platform=platform, node_index=n, hosts=hosts, addresses=addresses,
                               host_ips=ips, bind_host=None, run_dir="/r") for n in (0, 1))
    assert head.argv[head.argv.index("--host") + 1] == "x1.hsn.cm.aurora.alcf.anl.gov"
    assert dict(head.env)["VLLM_HOST_IP"] == "10.0.0.1"
    assert dict(worker.env)["VLLM_HOST_IP"] == "10.0.0.2"
    assert dict(worker.env)["MASTER_ADDR"] == "10.0.0.1"
    assert worker.argv[worker.argv.index("--master-addr") + 1] == "10.0.0.1"
    # the endpoints file lists the serving address, not the management name
    state = LocalFleet([head], startup_timeout=1, max_restarts=0).states()[0]
    assert (state.host, state.base_url) == ("x1.hsn.cm.aurora.alcf.anl.gov",
                                            f"http://x1.hsn.cm.aurora.alcf.anl.gov:{head.port}/v1")
