"""One [16384, 256] x [256, 512] product on a CPU: torch._scaled_mm (float8_e4m3fn) against an fp32 matmul of the
same values. Why quantization.report does not score real FP8 GEMMs on a CPU.

    python benchmarks/results/demo/scaled_mm_cpu_probe.py > benchmarks/results/demo/scaled_mm_cpu_probe.json
"""

import json
import platform
import time

import torch

rows, k, n = 16384, 256, 512
xq, wq = torch.randn(rows, k).to(torch.float8_e4m3fn), torch.randn(n, k).to(torch.float8_e4m3fn)
one = torch.tensor(1.0)
t = time.perf_counter()
torch._scaled_mm(xq, wq.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
fp8 = time.perf_counter() - t
xf, wf = xq.float(), wq.float()
times = []
for _ in range(5):
    t = time.perf_counter()
    xf @ wf.t()
    times.append(time.perf_counter() - t)
fp32 = min(times)
print(json.dumps({"what": __doc__.split("\n\n")[0].replace("\n", " "), "torch": torch.__version__,
                  "machine": platform.machine(), "threads": torch.get_num_threads(), "scaled_mm_s": round(fp8, 3),
                  "fp32_matmul_s (best of 5)": round(fp32, 5), "ratio": round(fp8 / fp32),
                  "command": "python benchmarks/results/demo/scaled_mm_cpu_probe.py"}, indent=1))
