"""Run torchdiffeq's own test suite against node_engine through an import shim.

Usage::

    python benchmarks/torchdiffeq_suite.py /path/to/torchdiffeq [--files odeint_tests.py ...]
        [--methods node_engine|all] [--causes N]

The torchdiffeq checkout is only read (its ``tests/`` directory); nothing of it is copied into
this repository. A temporary package named ``torchdiffeq`` re-exports node_engine's API
(``odeint``, ``odeint_adjoint``, ``odeint_event``, ``odeint_dense`` where present), is put first on
``sys.path``, and every test file runs in its own subprocess under ``unittest``. Cases are counted
the way torchdiffeq's tests are written: every ``subTest`` is one case (a test method without
subtests is one case). Failures are grouped by cause: exception type and the first line of its
message, with numbers masked; up to three failing cases per cause are named (test method and
subTest parameters).

``--methods node_engine`` (default ``all``) restricts ``problems.py``'s method lists to the
methods node_engine registers (as in issue 16's 145/491 baseline).

Prints a per-file table (passed / failed / errored) and the commonest causes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

FILES = ("api_tests.py", "odeint_tests.py", "gradient_tests.py", "norm_tests.py", "event_tests.py")
ROOT = Path(__file__).resolve().parents[1]

SHIM = '''\
"""Shim: torchdiffeq's public API, served by node_engine (benchmarks/torchdiffeq_suite.py)."""
import node_engine as _ne
from node_engine import odeint, odeint_adjoint
for _name in ("odeint_event", "odeint_dense"):
    if hasattr(_ne, _name):
        globals()[_name] = getattr(_ne, _name)
'''

# Runs inside the subprocess: one test file, every subTest counted, causes collected.
CHILD = textwrap.dedent('''\
    import json, re, sys, traceback, unittest, warnings
    tests_dir, fname, restrict, out_path = sys.argv[1:5]
    sys.path.insert(0, tests_dir)
    import problems
    if restrict == "node_engine":
        from node_engine.solvers import METHODS as _M
        have = set(_M)
        for name in dir(problems):
            v = getattr(problems, name)
            if name.isupper() and name.endswith("METHODS") and isinstance(v, tuple):
                setattr(problems, name, tuple(m for m in v if m in have))
    warnings.simplefilter("ignore")
    counts = {"passed": 0, "failed": 0, "errored": 0}
    causes = {}
    examples = {}

    def cause(err):
        etype, value, tb = err
        msg = str(value).strip().splitlines()[0] if str(value).strip() else ""
        msg = re.sub(r"(?<![\\w.])[-+]?\\d[\\d.e+-]*", "#", msg)[:140]
        return f"{etype.__name__}: {msg}"

    class Result(unittest.TextTestResult):
        def _bad(self, test, err, kind):
            counts[kind] += 1
            c = cause(err)
            causes[c] = causes.get(c, 0) + 1
            ex = examples.setdefault(c, [])
            if len(ex) < 3:
                ex.append(test.id().removeprefix(fname[:-3] + ".")[:200])
        def addSubTest(self, test, subtest, err):
            super().addSubTest(test, subtest, err)
            test._had_sub = True
            if err is None:
                counts["passed"] += 1
            else:
                self._bad(subtest, err, "failed" if issubclass(err[0], test.failureException) else "errored")
        def addSuccess(self, test):
            super().addSuccess(test)
            if not getattr(test, "_had_sub", False):
                counts["passed"] += 1
        def addFailure(self, test, err):
            super().addFailure(test, err)
            self._bad(test, err, "failed")
        def addError(self, test, err):
            super().addError(test, err)
            self._bad(test, err, "errored")

    mod = __import__(fname[:-3])
    suite = unittest.defaultTestLoader.loadTestsFromModule(mod)
    runner = unittest.TextTestRunner(resultclass=Result, verbosity=0, stream=open("/dev/null", "w"))
    runner.run(suite)
    json.dump({"counts": counts, "causes": causes, "examples": examples}, open(out_path, "w"))
''')


def run_file(td_tests: Path, fname: str, restrict: str, shim_dir: str, timeout: float, root: Path = ROOT) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out_path = f.name
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([shim_dir, str(root), env.get("PYTHONPATH", "")])
    env.setdefault("OMP_NUM_THREADS", "1")
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(td_tests), fname, restrict, out_path],
                              cwd=td_tests, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 and not os.path.getsize(out_path):
            return {"counts": {"passed": 0, "failed": 0, "errored": 1},
                    "causes": {"runner crashed: " + proc.stderr.strip().splitlines()[-1][:140]: 1},
                    "seconds": time.perf_counter() - t0}
        res = json.load(open(out_path))
    except subprocess.TimeoutExpired:
        res = {"counts": {"passed": 0, "failed": 0, "errored": 1}, "causes": {f"timeout after {timeout}s": 1}}
    finally:
        os.unlink(out_path)
    res["seconds"] = time.perf_counter() - t0
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("torchdiffeq", type=Path, help="path to a torchdiffeq checkout (its tests/ are run)")
    ap.add_argument("--files", nargs="*", default=list(FILES))
    ap.add_argument("--methods", choices=("all", "node_engine"), default="all")
    ap.add_argument("--causes", type=int, default=8, help="causes listed per file")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per file")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--root", type=Path, default=ROOT,
                    help="checkout whose node_engine is tested (default: this one; e.g. an older commit's worktree)")
    args = ap.parse_args(argv)
    td_tests = args.torchdiffeq / "tests"
    if not (td_tests / "problems.py").exists():
        ap.error(f"{td_tests} has no problems.py: point at a torchdiffeq checkout")
    results = {}
    with tempfile.TemporaryDirectory() as shim_dir:
        os.mkdir(os.path.join(shim_dir, "torchdiffeq"))
        Path(shim_dir, "torchdiffeq", "__init__.py").write_text(SHIM)
        for fname in args.files:
            res = run_file(td_tests, fname, args.methods, shim_dir, args.timeout, args.root.resolve())
            results[fname] = res
            c = res["counts"]
            n = sum(c.values())
            print(f"{fname:20s} passed {c['passed']:4d} / {n:4d}  failed {c['failed']:4d}  errored "
                  f"{c['errored']:4d}  ({res['seconds']:.0f} s)", flush=True)
            for why, k in sorted(res["causes"].items(), key=lambda kv: -kv[1])[: args.causes]:
                print(f"    {k:4d}  {why}", flush=True)
                for ex in res.get("examples", {}).get(why, []):
                    print(f"            e.g. {ex}", flush=True)
    tot = {k: sum(r["counts"][k] for r in results.values()) for k in ("passed", "failed", "errored")}
    print(f"{'total':20s} passed {tot['passed']:4d} / {sum(tot.values()):4d}  failed {tot['failed']:4d}  "
          f"errored {tot['errored']:4d}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
