"""Rank-aware engines: under torchrun each local rank's engine gets a disjoint share of the allowed CPUs."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

import ktmoe
from ktmoe import engine

# the ktmoe this test process imported (the installed package, or a source tree on PYTHONPATH)
SRC = os.path.dirname(os.path.dirname(os.path.abspath(ktmoe.__file__)))

_PROBE = textwrap.dedent("""
    import json, sys, warnings
    warnings.simplefilter("ignore", RuntimeWarning)
    from ktmoe import engine
    import ktmoe
    e = engine.get_engine(None, 1)
    info = ktmoe.cpu_info()
    print(json.dumps({"rank": info["rank"], "engine": info["engines"][0]["subpool_cpus"],
                      "allowed": info["allowed_cpus"]}))
""")


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "KTMOE_TOPOLOGY",
                                                           "KTMOE_RANK_SPLIT")}
    env["PYTHONPATH"] = SRC + os.pathsep + env.get("PYTHONPATH", "")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def _spawn(n, code=_PROBE, **extra):
    procs = [subprocess.Popen([sys.executable, "-c", code], env=_env(LOCAL_RANK=r, LOCAL_WORLD_SIZE=n, **extra),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(n)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        outs.append((p.returncode, out, err))
    return outs


@pytest.mark.parametrize("n", [2, 3])
def test_spawned_ranks_get_disjoint_cpu_sets_covering_the_allowed_set(n):
    res = [json.loads(out.strip().splitlines()[-1]) for rc, out, err in _spawn(n) if rc == 0 or print(err)]
    assert len(res) == n
    allowed = res[0]["allowed"]
    sets = [r["rank"]["cpus"] for r in res]
    assert [r["rank"]["local_rank"] for r in res] == list(range(n))
    for r in res:  # the engine runs on its rank's share, one thread per CPU by default
        assert sorted(c for p in r["engine"] for c in p) == r["rank"]["cpus"]
    if len(allowed) >= n:
        flat = [c for s in sets for c in s]
        assert len(flat) == len(set(flat)), f"overlapping CPU sets {sets}"
        assert sorted(flat) == allowed
    else:  # fewer CPUs than ranks: one CPU each, round robin, still covering the set
        assert all(len(s) == 1 for s in sets) and sorted({c for s in sets for c in s}) == allowed


def _fake_machine(monkeypatch, cpus, nodes):
    monkeypatch.setattr(engine, "allowed_cpus", lambda: list(cpus))
    monkeypatch.setattr(engine, "numa_nodes", lambda: {n: list(c) for n, c in nodes.items()})


@pytest.mark.parametrize("n", [2, 3])
def test_split_is_contiguous_on_one_node(monkeypatch, n):
    cpus = [0, 1, 2, 3, 4, 5, 6, 9]  # a hole in the allowed set: the split follows the allowed CPUs
    _fake_machine(monkeypatch, cpus, {0: cpus})
    sets = []
    for r in range(n):
        monkeypatch.setenv("LOCAL_RANK", str(r))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(n))
        s, how = engine.rank_cpus()
        assert how.startswith("contiguous")
        assert s == cpus[cpus.index(s[0]):cpus.index(s[0]) + len(s)]  # a contiguous run of the allowed list
        sets.append(s)
    assert sorted(c for s in sets for c in s) == cpus
    assert max(map(len, sets)) - min(map(len, sets)) <= 1


def test_split_gives_whole_numa_nodes(monkeypatch):
    nodes = {0: [0, 1, 2, 3], 1: [4, 5, 6, 7], 2: [8, 9, 10, 11], 3: [12, 13, 14, 15]}
    _fake_machine(monkeypatch, range(16), nodes)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    got = []
    for r in range(2):
        monkeypatch.setenv("LOCAL_RANK", str(r))
        s, how = engine.rank_cpus()
        assert "numa" in how
        got.append(s)
        # the rank's TP subpools then follow its own nodes
        pools, ids = engine.plan_subpools(8, 2, cpus=s)
        assert ids == [2 * r, 2 * r + 1] and pools == [nodes[2 * r], nodes[2 * r + 1]]
    assert got == [list(range(8)), list(range(8, 16))]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")  # 4 nodes, 3 ranks: still whole nodes, disjoint, covering
    sets = []
    for r in range(3):
        monkeypatch.setenv("LOCAL_RANK", str(r))
        sets.append(engine.rank_cpus()[0])
    assert sorted(c for s in sets for c in s) == list(range(16))
    assert all(len(s) % 4 == 0 for s in sets)


def test_no_split_outside_torchrun_or_when_disabled(monkeypatch):
    _fake_machine(monkeypatch, range(4), {0: list(range(4))})
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert engine.rank_cpus() == ([0, 1, 2, 3], "all")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert engine.rank_cpus()[0] == [2, 3]
    monkeypatch.setenv("KTMOE_RANK_SPLIT", "0")
    assert engine.rank_cpus()[0] == [0, 1, 2, 3]
    monkeypatch.setenv("LOCAL_RANK", "2")
    monkeypatch.delenv("KTMOE_RANK_SPLIT")
    with pytest.raises(ValueError, match="LOCAL_RANK=2"):
        engine.rank_cpus()


def test_per_rank_topology_env(monkeypatch):
    monkeypatch.setenv("KTMOE_TOPOLOGY", "0-1;2|3;4-5")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert engine._topology_from_env() == [[3], [4, 5]]
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert engine._topology_from_env() == [[0, 1], [2]]
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    with pytest.raises(ValueError, match="LOCAL_WORLD_SIZE=3"):
        engine._topology_from_env()


def test_topology_outside_the_allowed_cpus_is_refused(monkeypatch):
    bad = max(engine.allowed_cpus()) + 1000
    with pytest.raises(ValueError, match=rf"subpool_cpus names CPUs \[{bad}\] outside"):
        engine.get_engine(None, 2, [[engine.allowed_cpus()[0]], [bad]])
    monkeypatch.setenv("KTMOE_TOPOLOGY", f"{bad}")
    with pytest.raises(ValueError, match=rf"KTMOE_TOPOLOGY names CPUs \[{bad}\]"):
        engine.get_engine(None, 1)


def test_more_threads_than_the_share_warns(monkeypatch):
    out = _spawn(2, code=textwrap.dedent("""
        import warnings
        from ktmoe import engine
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            e = engine.get_engine(3, 1)
        print(e.subpool_cpus, [str(x.message) for x in w])
    """))
    for r, (rc, text, err) in enumerate(out):
        assert rc == 0, err
        if len(engine.allowed_cpus()) >= 2:
            assert "exceeds this rank's share" in text
            share = engine.allowed_cpus()[r * len(engine.allowed_cpus()) // 2:(r + 1) * len(engine.allowed_cpus()) // 2]
            assert text.startswith(str((tuple((share * 3)[:3]),)))  # stacked on its own CPUs only


def test_cpu_info_reports_the_rank_share():
    info = ktmoe.cpu_info()["rank"]
    assert set(info) == {"local_rank", "local_world_size", "cpus", "split"}


def test_torchrun_two_ranks(tmp_path):
    """The real launcher: two ranks, disjoint CPU sets."""
    script = tmp_path / "probe.py"
    script.write_text(_PROBE)
    env = _env(OMP_NUM_THREADS=1)
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "0",
                        str(script)], env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    res = [json.loads(line) for line in p.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"]["local_rank"] for r in res) == [0, 1]
    sets = [r["rank"]["cpus"] for r in res]
    if len(res[0]["allowed"]) >= 2:
        assert not set(sets[0]) & set(sets[1]) and sorted(sets[0] + sets[1]) == res[0]["allowed"]
