"""onnxruntime side of `sgps bench` (run by the Rust binary; also usable by hand).

Usage: python bench_onnxruntime.py SPEC.json   (or: python - SPEC.json < bench_onnxruntime.py)

SPEC = {"threads": 1, "reps": 20, "warmup": 3,
        "models": [{"name": "...", "path": "...onnx",
                    "inputs": {"<name>": {"dtype": "float32"|"int64", "shape": [..], "data": [..] | null}}}]}
Inputs with "data": null get seeded random values (standard normal for float, 1 for masks named
"*mask*"). Prints one JSON object: {"onnxruntime": version, "results": {name: {"median_ms", "p90_ms", "runs"}}}.
Latency per run is one `session.run` on the given inputs, after `warmup` untimed runs.
"""

import json
import sys
import time


def main():
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError as e:
        print(json.dumps({"error": f"onnxruntime/numpy not importable: {e}"}))
        return 3
    spec = json.load(open(sys.argv[1]))
    rng = np.random.default_rng(0)
    results = {}
    for m in spec["models"]:
        so = ort.SessionOptions()
        so.intra_op_num_threads = int(spec["threads"])
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        sess = ort.InferenceSession(m["path"], so, providers=["CPUExecutionProvider"])
        wanted = {i.name for i in sess.get_inputs()}
        feeds = {}
        for name, inp in m["inputs"].items():
            if name not in wanted:
                continue
            dtype = np.dtype(inp["dtype"])
            shape = inp["shape"]
            if inp.get("data") is not None:
                arr = np.asarray(inp["data"], dtype=dtype).reshape(shape)
            elif "mask" in name:
                arr = np.ones(shape, dtype=dtype)
            elif dtype.kind == "f":
                arr = rng.standard_normal(shape).astype(dtype)
            else:
                arr = np.zeros(shape, dtype=dtype)
            feeds[name] = arr
        for _ in range(int(spec["warmup"])):
            sess.run(None, feeds)
        times = []
        for _ in range(int(spec["reps"])):
            t = time.perf_counter()
            sess.run(None, feeds)
            times.append((time.perf_counter() - t) * 1000.0)
        times.sort()
        n = len(times)
        results[m["name"]] = {
            "median_ms": times[(n - 1) // 2] if n % 2 else 0.5 * (times[n // 2 - 1] + times[n // 2]),
            "p90_ms": times[min(n - 1, max(0, -(-9 * n // 10) - 1))],
            "runs": n,
        }
    print(json.dumps({"onnxruntime": ort.__version__, "threads": spec["threads"], "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
