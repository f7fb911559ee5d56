"""`topi-export bench`: consistent JSON, ratio 0 is exact, the default policy always included, Markdown and plot written."""
import json

import pytest

from conftest import run_cli


def test_bench_json_on_tiny(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code, stdout, err = run_cli(["bench", "--model", "tiny-kontext", "--ratio-buckets", "0,0.5",
                                 "--policies", "topi,random,uniform", "--steps", "4", "--update-interval", "2",
                                 "--tau", "0.5", "--json", str(out), "-q"], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())  # strict JSON
    from topi_export.method.selection import DEFAULT_POLICY

    assert report["default_policy"] == DEFAULT_POLICY
    rows = report["results"]
    pols = (DEFAULT_POLICY, "topi", "random", "uniform")  # the default policy is always benchmarked
    assert {(r["policy"], r["ratio"]) for r in rows if "tau" not in r} == {(p, r) for p in pols for r in (0.0, 0.5)}
    assert report["baseline"]["mode"] == "dense" and report["policies_use_influence"]["uniform"] is False
    for r in rows:
        for key in ("policy", "ratio", "psnr_db", "psnr_db_min", "rel_l2", "speedup"):
            assert key in r
    for r in (r for r in rows if r["ratio"] == 0.0 and "tau" not in r):
        assert r["rel_l2"] == 0.0 and r["psnr_db"] is None  # identical to the unpruned run
        assert r["speedup"] == pytest.approx(r["full_time_s"] / r["time_s"])
        assert r["keep"] == [64]
    pruned = [r for r in rows if r["ratio"] == 0.5]
    assert all(r["keep"] == [32] and r["rel_l2"] > 0 and r["psnr_db"] > 0 for r in pruned)
    assert {r["policy"] for r in rows if "tau" in r} == set(pols)  # tau per policy
    assert all(r["kept_influence"] >= 0.5 - 1e-6 for r in rows if "tau" in r)  # tau keeps tau of the influence
    assert all(r["flop_speedup"] > 1 and r["flop_e2e_speedup"] > 1 for r in pruned)
    assert (tmp_path / "bench.md").read_text().startswith("| policy")
    assert (tmp_path / "bench.png").stat().st_size > 1000
    assert "default policy" in stdout


def test_bench_sweeps_step_reuse(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code, stdout, err = run_cli(["bench", "--model", "tiny-kontext", "--ratio-buckets", "0.5", "--policies", "topi",
                                 "--no-default-policy", "--steps", "8", "--update-interval", "4", "--reuse",
                                 "off,2,3", "--repeats", "0", "--json", str(out), "-q"], capsys)
    assert code == 0, err
    rows = {r["reuse"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"off", 2, 3} and [rows[k]["reused_steps"] for k in ("off", 2, 3)] == [0, 2, 3]
    assert rows["off"]["psnr_db"] > rows[3]["psnr_db"]  # reusing velocities moves the result away from unpruned
    assert all(r["speedup"] is None for r in rows.values())  # --repeats 0: fidelity only
    assert "| reuse (steps) |" in (tmp_path / "bench.md").read_text().splitlines()[0]
