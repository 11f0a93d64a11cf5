"""Every benchmark in priority order within one wall-clock budget, then one report of the issue's targets.

Each stage runs in its own process (a crash or CUDA error in one cannot take the others down; compiled kernels are
shared through Inductor's and Triton's on-disk caches) with a deadline: the global one, or its own cap when that
comes first. A stage that runs past its deadline plus a grace period is killed; its JSON keeps the finished cases.

    python -m benchmarks.run_all --out $OUT --budget-s 480          # on the H100
    python -m benchmarks.run_all --smoke --out /tmp/bench            # CPU, tiny models: checks the code paths
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# (stage, module, extra args, cap seconds, least seconds worth starting with)
STAGES = [
    ("kernels", "benchmarks.kernels", [], 45, 20),
    ("transformer_480p", "benchmarks.transformer", ["--resolution", "480p"], 250, 60),
    ("streaming", "benchmarks.streaming", ["--blocks", "20"], 130, 50),
    ("vae", "benchmarks.vae", [], 90, 40),
    ("transformer_720p", "benchmarks.transformer", ["--resolution", "720p"], 110, 60),
    ("e2e", "benchmarks.e2e", [], 90, 45),
    # The linear-attention kernels last: their autotuning took 286 s of the 460 s on an H100.
    ("gpu_tests", "pytest", ["-q", "-m", "gpu", "--noconftest", "-p", "no:cacheprovider",
                             "tests/test_vae_fast.py", "tests/test_fast_path.py", "tests/test_fast_block.py",
                             "tests/test_kernels_mixffn.py", "tests/test_kernels_fp8.py",
                             "tests/test_kernels_linear_attention.py"], 480, 30),
]
RESULT_FILES = {"kernels": "kernels_480p.json", "transformer_480p": "transformer_480p.json",
                "streaming": "streaming_480p.json", "vae": "vae_480p.json", "transformer_720p": "transformer_720p.json", "e2e": "e2e_480p.json"}
GRACE_S = 45


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--budget-s", type=float, default=470)
    p.add_argument("--stages", default=",".join(s[0] for s in STAGES))
    p.add_argument("--smoke", action="store_true")
    args = p.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    deadline = start + args.budget_s
    wanted = args.stages.split(",")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    log = {"command": " ".join(getattr(sys, "orig_argv", sys.argv)), "budget_s": args.budget_s, "stages": []}
    for name, module, extra, cap, least in STAGES:
        if name not in wanted:
            continue
        if args.smoke and name in ("transformer_720p", "gpu_tests"):
            continue  # same code path as 480p / the CPU test run
        left = deadline - time.time()
        if left < least:
            log["stages"].append({"stage": name, "status": "skipped", "reason": f"{left:.0f}s left"})
            print(f"### {name}: skipped ({left:.0f}s left)", flush=True)
            continue
        stage_deadline = min(deadline, time.time() + cap)
        if module == "pytest":
            cmd = [sys.executable, "-m", "pytest", *extra]
        else:
            cmd = [sys.executable, "-m", module, *extra, "--out", str(out), "--deadline", str(stage_deadline)]
            if args.smoke:
                cmd.append("--smoke")
        print(f"### {name}: {' '.join(cmd)} (deadline in {stage_deadline - time.time():.0f}s)", flush=True)
        t0 = time.time()
        try:
            rc = subprocess.run(cmd, cwd=ROOT, env=env, timeout=stage_deadline - time.time() + GRACE_S).returncode
            status = "ok" if rc == 0 else f"exit {rc}"
        except subprocess.TimeoutExpired:
            status = "killed at deadline"
        log["stages"].append({"stage": name, "status": status, "wall_s": round(time.time() - t0, 1)})
        print(f"### {name}: {status} after {time.time() - t0:.0f}s", flush=True)

    log["wall_s"] = round(time.time() - start, 1)
    log["report"] = report(out, smoke=args.smoke)
    (out / "summary.json").write_text(json.dumps(log, indent=2))
    return 0


def report(out: Path, smoke: bool = False) -> dict:
    """Print and return every target of the issue with what this run measured."""
    rows = {}
    suffix = "smoke" if smoke else None
    for stage, fname in RESULT_FILES.items():
        if suffix:
            fname = fname.replace("480p", suffix)
        path = out / fname
        if path.exists():
            doc = json.loads(path.read_text())
            rows[stage] = doc.get("summary", {}).get("targets", {})
            rows[stage + "_cases"] = {c["name"]: {k: c.get(k) for k in (
                "status", "s_per_step", "speedup_vs_diffusers_compiled", "rel_err_vs_fp32_reference",
                "rel_err_vs_ours_fast_compiled", "fps", "first_frames_s", "clip_s", "s_per_block", "error") if c.get(k) is not None}
                for c in doc.get("cases", [])}
    print("\n==================== targets ====================")
    if smoke:
        print("(smoke run: tiny models on CPU, the numbers say nothing about speed)")
    for stage, targets in rows.items():
        if stage.endswith("_cases"):
            continue
        for name, t in targets.items():
            met = t.get("met")
            mark = "MET " if met else ("MISS" if met is False else "    ")
            print(f"[{mark}] {stage:17s} {name:36s} target {t.get('target')!s:9s} measured {t.get('measured')}")
    print("==================== cases ======================")
    for stage, cases in rows.items():
        if stage.endswith("_cases"):
            for name, c in cases.items():
                print(f"{stage[:-6]:17s} {name:26s} {c}")
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
