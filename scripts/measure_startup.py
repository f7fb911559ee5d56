"""Start-up cost of opening an engine directory: seconds and bytes read by `topi-export run --steps 1`.

Runs the command in a child Python (the checkout given by --code, so an older commit can be measured the same way)
and reads, when it exits, its wall time, the seconds its one step took (from the run report), and from
/proc/self/io the bytes it read through read() calls (rchar, page cache included) and from storage (read_bytes).
"first" starts with an empty verification cache (a directory copied from elsewhere, or a first release without the
cache); "second" reuses the cache the first run left. Usage:

    python scripts/measure_startup.py --engine-dir E --model M --runs first,second --json out.json
    python scripts/measure_startup.py --engine-dir E_old --model M --code /path/to/old/checkout --runs first,second
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import atexit, json, sys
def report():
    io = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    print("IO " + json.dumps({k: int(v) for k, v in io.items()}), file=sys.stderr)
atexit.register(report)
from topi_export.cli import main
main(sys.argv[1:])
"""


def run_once(code: Path, engine_dir: str, model: str | None, cache: Path, report: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(code), TOPI_EXPORT_CACHE_DIR=str(cache), TQDM_DISABLE="1")
    args = ["run", "--engine-dir", engine_dir, "--steps", "1", "-q", "--json", str(report)]
    if model:
        args += ["--model", model]
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", CHILD, *args], env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if out.returncode != 0:
        raise SystemExit(f"run failed:\n{out.stderr[-2000:]}")
    io = json.loads(next(line[3:] for line in out.stderr.splitlines() if line.startswith("IO ")))
    step = sum(r["time_s"] for r in json.loads(report.read_text())["schedule"])
    return {"wall_s": wall, "step_s": step, "to_first_step_s": wall - step, "rchar": io["rchar"],
            "read_bytes": io["read_bytes"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--engine-dir", required=True)
    ap.add_argument("--model", default=None, help="the model folder (older releases did not need it)")
    ap.add_argument("--code", default=str(Path(__file__).resolve().parents[1]), help="checkout to run")
    ap.add_argument("--runs", default="first,second")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    cache = Path(tempfile.mkdtemp(prefix="topi-startup-cache-"))
    files = sum(p.stat().st_size for p in Path(args.engine_dir).rglob("*") if p.is_file())
    rows = []
    for name in args.runs.split(","):
        r = run_once(Path(args.code), args.engine_dir, args.model, cache, cache / f"{name}.json")
        rows.append({"run": name, **r})
        print(f"{name:7s} to first step {r['to_first_step_s']:7.2f} s  wall {r['wall_s']:7.2f} s  "
              f"read() {r['rchar'] / 1e9:6.2f} GB  from storage {r['read_bytes'] / 1e9:6.2f} GB  "
              f"(engine directory {files / 1e9:.2f} GB)")
    if args.json:
        Path(args.json).write_text(json.dumps({"engine_dir": args.engine_dir, "engine_dir_bytes": files,
                                               "code": args.code, "runs": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
