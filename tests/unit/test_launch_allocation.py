"""Node lists: PBS_NODEFILE, SLURM_JOB_NODELIST forms, explicit lists, local, too few nodes."""

import pytest

from aegis.launch.allocation import check_enough, find_allocation
from aegis.scheduler.nodelist import AllocationError, expand_slurm_nodelist, parse_nodefile


@pytest.mark.parametrize("nodelist, expected", [
    ("node1", ["node1"]),
    ("node[1-3,5]", ["node1", "node2", "node3", "node5"]),
    ("node[1-3,5],gpu-[01-02]", ["node1", "node2", "node3", "node5", "gpu-01", "gpu-02"]),
    ("a,b,c", ["a", "b", "c"]),
    ("x[08-11]", ["x08", "x09", "x10", "x11"]),
    ("frontier[00001-00003]", ["frontier00001", "frontier00002", "frontier00003"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("n[1-2],n1", ["n1", "n2"]),  # duplicates folded, order kept
    ("x4000c0s[0-1]b0n0", ["x4000c0s0b0n0", "x4000c0s1b0n0"]),
])
def test_expand_slurm_nodelist(nodelist, expected):
    assert expand_slurm_nodelist(nodelist) == expected


@pytest.mark.parametrize("bad, word", [
    ("node[1-3", "unbalanced '['"), ("node1-3]", "unbalanced ']'"), ("node[a-b]", "bad range"),
    ("node[5-1]", "descending"), ("a,,b", "empty entry"), ("", "empty"),
])
def test_bad_slurm_nodelists_are_one_line_errors(bad, word):
    with pytest.raises(AllocationError, match="SLURM_JOB_NODELIST") as e:
        expand_slurm_nodelist(bad, "SLURM_JOB_NODELIST")
    assert word in str(e.value) and "\n" not in str(e.value)


def test_pbs_nodefile_keeps_each_host_once_in_order():
    text = "x1.hsn\nx1.hsn\nx3.hsn\n\nx2.hsn\nx3.hsn\n"
    assert parse_nodefile(text) == ["x1.hsn", "x3.hsn", "x2.hsn"]


def _find(env=None, nodes=None, nodefile_text=None, files=None, local_count=3):
    files = files or {}

    def read(path):
        if path not in files:
            raise FileNotFoundError(2, "No such file or directory")
        return files[path]
    return find_allocation(nodes=nodes, nodefile_text=nodefile_text, nodefile_name="nf",
                           env=env or {}, read_file=read, local_count=local_count)


def test_sources_in_priority_order():
    env = {"PBS_NODEFILE": "/pbs", "SLURM_JOB_NODELIST": "s[1-2]"}
    files = {"/pbs": "p1\np1\np2\n"}
    assert _find(env, nodes="n[1-2]", files=files).nodes == ("n1", "n2")
    assert _find(env, nodefile_text="f1\nf2\n", files=files).nodes == ("f1", "f2")
    assert _find(env, files=files).nodes == ("p1", "p2")
    assert _find(env, files=files).source == "PBS_NODEFILE"
    assert _find({"SLURM_JOB_NODELIST": "s[1-2]"}).nodes == ("s1", "s2")
    local = _find({}, local_count=3)
    assert local.nodes == ("127.0.0.1",) * 3 and local.source == "local machine"


def test_unreadable_pbs_nodefile_is_a_clear_error():
    with pytest.raises(AllocationError, match=r"PBS_NODEFILE /nope: cannot read it"):
        _find({"PBS_NODEFILE": "/nope"})


def test_too_few_nodes_names_both_numbers():
    alloc = _find({"SLURM_JOB_NODELIST": "n[1-2]"})
    check_enough(alloc, 2)
    with pytest.raises(AllocationError) as e:
        check_enough(alloc, 3)
    assert str(e.value) == ("the plan needs 3 node(s) but the allocation (SLURM_JOB_NODELIST) "
                            "has 2: n1, n2")


def test_node_ranges_up_to_the_cap_expand_and_beyond_it_are_counted_not_built():
    from aegis.scheduler.nodelist import expand_slurm_nodelist
    from aegis.plan import MAX_NODES

    assert len(expand_slurm_nodelist(f"n[1-{MAX_NODES}]")) == MAX_NODES
    with pytest.raises(AllocationError, match="names more than 100000 nodes"):
        expand_slurm_nodelist(f"n[0-{MAX_NODES}]")
    with pytest.raises(AllocationError, match="more than 100000 nodes"):
        expand_slurm_nodelist(f"a[1-{MAX_NODES}],b[1-{MAX_NODES}]")
    assert expand_slurm_nodelist("x[08-10]y[1,3]") == ["x08y1", "x08y3", "x09y1", "x09y3",
                                                       "x10y1", "x10y3"]


def test_each_batch_system_knows_its_jobs_nodes_and_id():
    from aegis.scheduler import PBSBackend, SlurmBackend, job_id_in

    files = {"/pbs/nodes": "x1\nx1\nx2\n"}
    pbs = PBSBackend().nodes_in({"PBS_NODEFILE": "/pbs/nodes"}, files.__getitem__)
    assert (pbs.nodes, pbs.source) == (("x1", "x2"), "PBS_NODEFILE")
    slurm = SlurmBackend().nodes_in({"SLURM_JOB_NODELIST": "n[1-3]"}, files.__getitem__)
    assert (slurm.nodes, slurm.source) == (("n1", "n2", "n3"), "SLURM_JOB_NODELIST")
    assert PBSBackend().nodes_in({}, files.__getitem__) is None
    assert job_id_in({"PBS_JOBID": "7.pbs"}) == "7.pbs"
    assert job_id_in({"SLURM_JOB_ID": "8"}) == "8" and job_id_in({}) is None


def test_the_launcher_reads_no_batch_system_variable_itself():
    """Adding a scheduler stays one module: launch/ asks aegis.scheduler, never PBS_*/SLURM_*."""
    import re
    from pathlib import Path

    import aegis.launch

    found = []
    for path in Path(aegis.launch.__file__).parent.glob("*.py"):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if re.search(r"""["'](PBS|SLURM)_[A-Z_]+["']""", code):
                found.append(f"{path.name}:{n}: {line.strip()}")
    assert not found, found
