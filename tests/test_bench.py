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


def test_markdown_table_has_the_per_sample_minimum_of_every_policy(tmp_path, capsys):
    """Every row of the Markdown table gives mean (per-sample minimum) vs the unpruned run and, when the inputs carry
    ground truth, vs the truth; the numbers are the JSON's."""
    import torch

    from topi_export import Layout, load_model, save_inputs

    fam = load_model("tiny-kontext").family
    files = []
    for seed in (1, 2, 3):
        data = fam.synthetic_inputs(Layout(8, (4, 4), ((4, 4),)), seed)
        data.target_latents = torch.randn(1, 16, fam.in_channels, generator=torch.Generator().manual_seed(seed))
        files.append(str(tmp_path / f"in{seed}.safetensors"))
        save_inputs(files[-1], data)
    out = tmp_path / "b.json"
    code, _, err = run_cli(["bench", "--model", "tiny-kontext", "--inputs", *files, "--ratio-buckets", "0.5",
                            "--policies", "topi,uniform", "--steps", "3", "--update-interval", "2", "--json", str(out),
                            "-q"], capsys)
    assert code == 0, err
    report = json.loads(out.read_text())
    lines = (tmp_path / "b.md").read_text().splitlines()
    assert "PSNR vs unpruned [dB]: mean (min)" in lines[0] and "PSNR vs truth [dB]: mean (min)" in lines[0]
    base = report["baseline"]
    assert len(base["psnr_gt_db_per_sample"]) == 3 and base["psnr_gt_db_min"] == min(base["psnr_gt_db_per_sample"])
    assert f"{base['psnr_gt_db']:.2f} ({base['psnr_gt_db_min']:.2f})" in lines[2]
    for r in report["results"]:
        row = next(line for line in lines if line.startswith(f"| {r['policy']} | 0.5 |"))
        assert r["psnr_db_min"] == min(r["psnr_db_per_sample"]) < max(r["psnr_db_per_sample"])
        assert r["psnr_gt_db_min"] == min(r["psnr_gt_db_per_sample"])
        assert f"{r['psnr_db']:.2f} ({r['psnr_db_min']:.2f})" in row
        assert row.rstrip().endswith(f"{r['psnr_gt_db']:.2f} ({r['psnr_gt_db_min']:.2f}) |")


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
