"""A/B of a trained network's forward: the module as it was at a git revision against the working tree.

Run (repository root): python scripts/bench_network_forward.py mrdfn [--old a8576ae] [--calls 100]
                          [--modes 1t,2py,cl2,chunks]

Both models get the shipped weights (checksummed; LYWNet's BatchNorms folded, as the registry builds
it) and the same inputs, 2 random 256x256 slices a call (the engine's CPU chunk) unless --chunk says
otherwise. Outputs are compared first (bit for bit, or the largest difference is printed); then 10
warm-up rounds and --calls timed rounds, old and new alternating call by call (the order reversed
every other round: the second call of a round ran systematically slower under load), under
torch.inference_mode. Modes:
  1t      1 torch thread, default (NCHW) layout: wall and thread CPU time medians;
  2py     2 Python threads at 1 torch thread each on their own inputs (the engine's workers); both run
          the same variant at the same time (a barrier before every call): wall medians;
  cl2     2 torch threads, the model converted to channels-last (networks/inference.py does so when
          torch has several threads);
  chunks  1 torch thread: per 2 slices, one call of 2 against two calls of 1, old and new.
The machine's load average is printed before and after: on a shared machine, quote ratios from one run.
"""
from __future__ import annotations

import argparse
import copy
import pathlib
import statistics
import subprocess
import sys
import threading
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "MedicalFusion"))

import torch  # noqa: E402

from MedicalFusionLib.methods import get_method  # noqa: E402

CLASSES = {"mrdfn": "MRDFN", "lywnet": "LYWNet"}


def old_model(name: str, rev: str, new: torch.nn.Module) -> torch.nn.Module:
    """The network's module file at ``rev``, run in its own namespace (its registration skipped), with
    the new model's weights (same state_dict keys)."""
    path = f"MedicalFusion/MedicalFusionLib/networks/{name}.py"
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:{path}"], check=True, capture_output=True,
                            text=True).stdout
    source = source.replace("from .inference import register_network",
                            "def register_network(*args, **kwargs):\n    pass")
    namespace: dict = {"__name__": f"old_{name}"}
    exec(compile(source, f"{rev}:{path}", "exec"), namespace)
    model = namespace[CLASSES[name]](**new.settings)
    if hasattr(model, "fold_bn"):
        model.eval().fold_bn()
    model.load_state_dict(new.state_dict())
    return model.eval()


def median_ms(values):
    return 1e3 * statistics.median(values)


def load():
    return " ".join(open("/proc/loadavg").read().split()[:3])


def serial(fns, args, calls, label):
    wall = {k: [] for k in fns}
    cpu = {k: [] for k in fns}
    with torch.inference_mode():
        for i in range(10 + calls):
            for k in (list(fns) if i % 2 == 0 else list(fns)[::-1]):     # ABBA: no variant always first
                f = fns[k]
                t, c = time.perf_counter(), time.thread_time()
                f(*args)
                if i >= 10:
                    wall[k].append(time.perf_counter() - t)
                    cpu[k].append(time.thread_time() - c)
    for k in fns:
        print(f"{label} {k}: wall median {median_ms(wall[k]):.1f} ms (10th pct "
              f"{1e3 * sorted(wall[k])[calls // 10]:.1f}), thread CPU median {median_ms(cpu[k]):.1f} ms")
    first, *rest = fns
    for k in rest:
        print(f"{label} {k}/{first}: wall {median_ms(wall[k]) / median_ms(wall[first]):.3f}, "
              f"CPU {median_ms(cpu[k]) / median_ms(cpu[first]):.3f}")


def two_workers(fns, inputs, calls):
    barrier = threading.Barrier(2)
    wall = {k: [] for k in fns}

    def work(i):
        a, b = inputs[i]
        with torch.inference_mode():
            for r in range(10 + calls):
                for k in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                    f = fns[k]
                    barrier.wait()
                    t = time.perf_counter()
                    f(a, b)
                    if r >= 10:
                        wall[k].append(time.perf_counter() - t)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in fns:
        print(f"2py {k}: wall median {median_ms(wall[k]):.1f} ms per call ({len(wall[k])} calls, both workers)")
    print(f"2py new/old: wall {median_ms(wall['new']) / median_ms(wall['old']):.3f}")


def compare(old, new, a, b, label):
    with torch.inference_mode():
        x, y = old(a, b), new(a, b)
    same = torch.equal(x, y)
    print(f"{label}: outputs {'bit-identical' if same else 'DIFFER, max |diff| %.3g' % (x - y).abs().max()}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("network", choices=sorted(CLASSES))
    p.add_argument("--old", default="a8576ae", help="git revision of the old module (default: a8576ae)")
    p.add_argument("--calls", type=int, default=100)
    p.add_argument("--chunk", type=int, default=2, help="slices per call (default 2, the engine's CPU chunk)")
    p.add_argument("--modes", default="1t,2py,cl2,chunks")
    args = p.parse_args(argv)
    modes = args.modes.split(",")

    torch.set_num_threads(1)
    new = get_method(args.network).build(torch.device("cpu")).model      # 1 thread: default layout
    old = old_model(args.network, args.old, new)
    g = torch.Generator().manual_seed(0)
    inputs = [tuple(torch.rand(args.chunk, 1, 256, 256, generator=g) for _ in range(2)) for _ in range(2)]
    a, b = inputs[0]
    print(time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), f"{args.network}, old = {args.old}, "
          f"{args.chunk} x 256x256 a call, torch {torch.__version__}; load average before: {load()}")
    if "1t" in modes:
        compare(old, new, a, b, "1t")
        serial({"old": old, "new": new}, (a, b), args.calls, "1t")
    if "2py" in modes:
        two_workers({"old": old, "new": new}, inputs, args.calls)
    if "chunks" in modes:
        def by_one(model):
            return lambda a, b: [model(a[i:i + 1], b[i:i + 1]) for i in range(len(a))]
        serial({"old": old, "new": new, "old by 1": by_one(old), "new by 1": by_one(new)}, (a, b), args.calls,
               "chunks")
    if "cl2" in modes:
        torch.set_num_threads(2)
        old_cl = copy.deepcopy(old).to(memory_format=torch.channels_last)
        new_cl = copy.deepcopy(new).to(memory_format=torch.channels_last)
        compare(old_cl, new_cl, a, b, "cl2")
        serial({"old": old_cl, "new": new_cl}, (a, b), args.calls, "cl2")
    print(time.strftime("%H:%M:%S UTC", time.gmtime()), f"load average after: {load()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
