"""DP-SGD throughput next to the peers (Opacus, torch.func, JAX/jax_privacy) on this machine.

    python benchmarks/peers/run.py                      # full run: (16,4), (64,1), (32,4), 5 steps
    python benchmarks/peers/run.py --settings 16x4 --steps 1 --warmup 1   # quick check

Every framework trains the same WRN-16-4 (GroupNorm with 16 groups, plain convolutions without
weight standardization, no BatchNorm) on the same synthetic images [B, K, 32, 32, 3]. A DP step
takes, per example, the gradient of its mean loss over its K copies, clips it to norm 1, sums,
adds Gaussian noise (sigma 1) and takes an SGD step; a non-private step is the ordinary step on
the B*K images. Opacus cannot group copies by example: its row clips each of the B*K images
separately (labelled). Each row runs in its own process with the same thread count, in its own
virtualenv (created here under benchmarks/peers/.venvs from the requirements files), one after
another. A peer that fails to install or to run is reported as such in the table.

Writes benchmarks/results/peers.md and peers.json and prints the table.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import pathlib
import platform
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import thread_environment  # noqa: E402

RESULTS = HERE.parent / "results"
DEFAULT_VENVS = HERE / ".venvs"

# framework -> script, virtualenv name and its requirements file (None: the interpreter running
# this driver, which has dp-keras-scale installed), methods.
# Each method: (name, label, clipping unit, is_private).
FRAMEWORKS: dict[str, dict] = {
    "ours": {
        "title": "dp-keras-scale (Keras 3 / TF, XLA)",
        "script": "bench_keras.py",
        "requirements": None,
        "methods": [
            ("nonprivate", "keras.Model, SGD", "-", False),
            ("dp", "DPScaleModel + DPSGD", "example (mean over K copies)", True),
        ],
    },
    "ours-batched": {
        "title": "dp-keras-scale (Keras 3 / TF, no XLA, batched clipping)",
        "script": "bench_keras.py",
        "requirements": None,
        "methods": [
            ("nonprivate_nojit", "keras.Model, SGD", "-", False),
            ("dp_batched", "DPScaleModel, clipping_method='auto'",
             "example (mean over K copies)", True),
            ("dp_batched_ws", "the same, WS convolutions (the paper's model)",
             "example (mean over K copies)", True),
        ],
    },
    "torch": {
        "title": "PyTorch (eager)",
        "script": "bench_torch.py",
        "venv": "torch",
        "requirements": "requirements-torch.txt",
        "methods": [
            ("nonprivate", "nn.Module, SGD", "-", False),
            ("opacus", "Opacus PrivacyEngine (hooks)", "row: each of the B*K images", True),
            ("func", "torch.func vmap(grad)", "example (mean over K copies)", True),
        ],
    },
    "jax": {
        "title": "JAX (jit)",
        "script": "bench_jax.py",
        "venv": "jax",
        "requirements": "requirements-jax.txt",
        "methods": [
            ("nonprivate", "jax.grad, SGD", "-", False),
            ("dp", "jax_privacy clipped_grad (vmap of grad)", "example (mean over K copies)",
             True),
        ],
    },
    "keras-jax": {
        "title": "Keras 3 on JAX (XLA)",
        "script": "bench_keras_jax.py",
        "venv": "jax",
        "requirements": "requirements-jax.txt",
        "methods": [
            ("nonprivate", "keras.Model, SGD", "-", False),
            ("dp", "jax_privacy.keras_api.make_private", "row: each of the B*K images", True),
        ],
    },
}


def parse_settings(text: str) -> list[tuple[int, int]]:
    settings = []
    for item in text.split(","):
        try:
            b, k = (int(v) for v in item.lower().split("x"))
        except ValueError:
            raise SystemExit(f"--settings takes BxK pairs separated by commas, e.g. 16x4,64x1; "
                             f"got {item!r}") from None
        if b < 1 or k < 1:
            raise SystemExit(f"B and K must be >= 1, got {item!r}")
        settings.append((b, k))
    return settings


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "(no output)"


def ensure_venv(name: str, requirements: pathlib.Path, venvs: pathlib.Path,
                install: bool) -> tuple[pathlib.Path | None, str]:
    """Creates/updates the framework's virtualenv. Returns (python, "") or (None, error)."""
    venv = venvs / name
    python = venv / "bin" / "python"
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()
    stamp = venv / ".requirements-sha256"
    if stamp.exists() and stamp.read_text().strip() == digest and python.exists():
        return python, ""
    if not install:
        return None, f"not installed ({venv} missing or stale; run without --no-install)"
    venvs.mkdir(parents=True, exist_ok=True)
    log = venvs / f"{name}-install.log"
    print(f"[{name}] creating {venv} and installing {requirements.name} (log: {log})",
          flush=True)
    with open(log, "w") as f:
        steps = [[sys.executable, "-m", "venv", "--clear", str(venv)],
                 [str(python), "-m", "pip", "install", "--quiet", "--upgrade", "pip"],
                 [str(python), "-m", "pip", "install", "-r", str(requirements),
                  *os.environ.get("PEERS_PIP_ARGS", "").split()]]
        for cmd in steps:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT)
            if proc.returncode != 0:
                f.flush()
                return None, f"install failed: {_last_line(log.read_text())} (see {log})"
    stamp.write_text(digest + "\n")
    return python, ""


def run_row(python: pathlib.Path, script: pathlib.Path, method: str, batch: int, copies: int,
            args: argparse.Namespace) -> dict:
    """Runs one row in its own process; returns its record or {'error': ...}."""
    env = {**os.environ, **thread_environment(args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "row.json"
        cmd = [str(python), str(script), "--method", method, "--batch", str(batch),
               "--copies", str(copies), "--steps", str(args.steps), "--warmup",
               str(args.warmup), "--threads", str(args.threads), "--out", str(out)]
        load = os.getloadavg()[0]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  timeout=args.timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {args.timeout} s", "load_1min_at_start": load}
        wall = time.perf_counter() - start
        if proc.returncode != 0 or not out.exists():
            return {"error": f"exit {proc.returncode}: {_last_line(proc.stderr)}",
                    "load_1min_at_start": load}
        record = json.loads(out.read_text())
        record.update(load_1min_at_start=load, process_wall_s=wall)
        return record


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: %.2f, %.2f, %.2f" % os.getloadavg()


def render(report: dict) -> str:
    """The markdown table: one line per (framework, method), one column group per setting."""
    settings = [tuple(s) for s in report["settings"]]
    rows = report["rows"]
    a = report["args"]

    def rec(fw, method, b, k):
        for r in rows:
            if (r["framework_key"], r["method_key"], r["B"], r["K"]) == (fw, method, b, k):
                return r
        return None

    head = ["framework", "step", "clipped unit"]
    for b, k in settings:
        head += [f"B={b} K={k} img/s", "DP / non-priv."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for fw, spec in FRAMEWORKS.items():
        if fw not in report["frameworks"]:
            continue
        status = report["frameworks"][fw]
        for method, label, unit, private in spec["methods"]:
            cells = [f"{spec['title']}" if method == spec["methods"][0][0] else "", label, unit]
            for b, k in settings:
                r = rec(fw, method, b, k)
                if status.get("error"):
                    cells += [status["error"].split(":")[0], ""]
                elif r is None or "error" in r:
                    cells += ["failed" if r else "not run", ""]
                else:
                    base = rec(fw, spec["methods"][0][0], b, k)
                    ratio = ""
                    if private and base and "images_per_s" in base:
                        ratio = f"{r['images_per_s'] / base['images_per_s']:.2f}"
                    cells += [f"{r['images_per_s']:.1f}", ratio]
            lines.append("| " + " | ".join(cells) + " |")

    def per_setting_table(cell) -> list[str]:
        head = ["framework", "step"] + [f"B={b} K={k}" for b, k in settings]
        out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for fw, spec in FRAMEWORKS.items():
            if fw not in report["frameworks"]:
                continue
            for method, label, _, _ in spec["methods"]:
                cells = [spec["title"] if method == spec["methods"][0][0] else "", label]
                for b, k in settings:
                    r = rec(fw, method, b, k)
                    cells.append(cell(r) if r and "images_per_s" in r else "-")
                out.append("| " + " | ".join(cells) + " |")
        return out

    cost = ["", "Images per CPU-second (process CPU time of the timed steps, all threads): "
            "depends less on other processes than wall-clock time, but also counts threads "
            "that busy-wait, so it is a cross-check, not the headline:", ""]
    cost += per_setting_table(lambda r: f"{r['images_per_cpu_s']:.1f}")
    cost += ["", f"Warm-up ({a['warmup']} untimed steps, compilation included) in seconds / "
             "peak resident memory of the row's process in MiB:", ""]
    cost += per_setting_table(lambda r: f"{r['warmup_s']:.0f} s / {r['peak_rss_mib']:.0f} MiB")

    loads = sorted(r["load_1min_at_start"] for r in rows if "load_1min_at_start" in r)
    load_line = (f"1-minute load average at the start of the {len(loads)} rows: min "
                 f"{loads[0]:.2f}, median {loads[len(loads) // 2]:.2f}, max {loads[-1]:.2f} "
                 f"(on {report['cpu_count']} CPUs)" if loads else "")
    info = [f"WRN-{a['depth']}-{a['width']} (GroupNorm 16 groups, plain convolutions, no "
            f"BatchNorm), synthetic images [B, K, 32, 32, 3], SGD lr 0.1, clip 1, sigma 1; "
            f"{a['threads']} threads per framework (machine: {report['cpu_count']} CPUs, "
            f"{report['machine']}); images/s = B*K / median step time over {a['steps']} timed "
            f"steps after {a['warmup']} warm-up steps; each row in its own process.", "",
            f"Load before: `{report['uptime_before']}`  ",
            f"Load after: `{report['uptime_after']}`  ", load_line, "",
            f"Command: `{report['command']}` ({report['date']})", ""]
    notes = ["", "| framework | versions | parameters | status |", "|---|---|---|---|"]
    for fw, status in report["frameworks"].items():
        versions = ", ".join(f"{k} {v}" for k, v in status.get("versions", {}).items())
        if not versions and status.get("requested"):
            versions = "requested: " + ", ".join(status["requested"])
        params = ", ".join(sorted({str(r["params"]) for r in rows
                                   if r["framework_key"] == fw and "params" in r})) or "-"
        errors = [f"{r['method_key']} B={r['B']} K={r['K']}: {r['error']}" for r in rows
                  if r["framework_key"] == fw and "error" in r]
        state = status.get("error") or ("; ".join(errors) if errors else "ok")
        notes.append(f"| {FRAMEWORKS[fw]['title']} | {versions or '-'} | {params} | {state} |")
    row_notes = sorted({f"{FRAMEWORKS[r['framework_key']]['title']} / {r['method_key']}: "
                        f"{r['notes']}" for r in rows if r.get("notes")})
    notes += [""] + [f"- {n}" for n in row_notes]
    return "\n".join(info + lines + notes + cost) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="16x4,64x1,32x4",
                        help="comma-separated BxK settings (B examples x K copies per step)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per row (median)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per row")
    parser.add_argument("--threads", type=int, default=2, help="compute threads, every framework")
    parser.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                        help=f"subset of {','.join(FRAMEWORKS)}")
    parser.add_argument("--venvs", type=pathlib.Path, default=DEFAULT_VENVS,
                        help="where the peers' virtualenvs live")
    parser.add_argument("--no-install", action="store_true",
                        help="do not create/update virtualenvs (a missing one is reported)")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per row")
    parser.add_argument("--out", type=pathlib.Path, default=RESULTS / "peers",
                        help="output path without suffix (.md and .json are written)")
    args = parser.parse_args()
    settings = parse_settings(args.settings)
    frameworks = [f.strip() for f in args.frameworks.split(",") if f.strip()]
    unknown = set(frameworks) - set(FRAMEWORKS)
    if unknown:
        raise SystemExit(f"unknown frameworks {sorted(unknown)}; choose from {list(FRAMEWORKS)}")
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        raise SystemExit("--steps and --threads must be >= 1, --warmup >= 0")

    pythons: dict[str, pathlib.Path | None] = {}
    status: dict[str, dict] = {}
    venv_results: dict[str, tuple[pathlib.Path | None, str]] = {}
    for fw in frameworks:
        spec = FRAMEWORKS[fw]
        if spec["requirements"] is None:
            pythons[fw], error = pathlib.Path(sys.executable), ""
        else:
            if spec["venv"] not in venv_results:
                venv_results[spec["venv"]] = ensure_venv(
                    spec["venv"], HERE / spec["requirements"], args.venvs, not args.no_install)
            pythons[fw], error = venv_results[spec["venv"]]
        status[fw] = {"error": error} if error else {}
        if error and spec["requirements"]:
            status[fw]["requested"] = [
                line.strip() for line in (HERE / spec["requirements"]).read_text().splitlines()
                if line.strip() and not line.startswith("#")]
        if error:
            print(f"[{fw}] {error}", flush=True)

    before = uptime()
    print(f"load before: {before}", flush=True)
    report = {
        "command": "python " + " ".join(
            [str(pathlib.Path(sys.argv[0]).resolve().relative_to(HERE.parent.parent))
             if pathlib.Path(sys.argv[0]).resolve().is_relative_to(HERE.parent.parent)
             else sys.argv[0], *sys.argv[1:]]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": platform.platform(), "processor": platform.processor(),
        "cpu_count": os.cpu_count(), "uptime_before": before, "uptime_after": "(running)",
        "complete": False,
        "args": {**{k: (str(v) if isinstance(v, pathlib.Path) else v)
                    for k, v in vars(args).items()}, "depth": 16, "width": 4},
        "settings": settings, "frameworks": status, "rows": [],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> str:
        table = render(report)
        if not report["complete"]:
            table = "**Partial results (the run did not finish).**\n\n" + table
        args.out.with_suffix(".md").write_text(table)
        args.out.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
        return table

    for b, k in settings:  # setting-major: every framework sees similar machine conditions
        for fw in frameworks:
            if pythons[fw] is None:
                continue
            for method, *_ in FRAMEWORKS[fw]["methods"]:
                record = run_row(pythons[fw], HERE / FRAMEWORKS[fw]["script"], method, b, k,
                                 args)
                record.update(framework_key=fw, method_key=method, B=b, K=k)
                if "versions" in record:
                    status[fw].setdefault("versions", record["versions"])
                if "error" in record:
                    print(f"[{fw} {method} B={b} K={k}] {record['error']}", flush=True)
                else:
                    print(f"[{fw} {method} B={b} K={k}] {record['images_per_s']:.1f} images/s "
                          f"({record['params']} parameters, "
                          f"load {record['load_1min_at_start']:.2f})", flush=True)
                report["rows"].append(record)
                save()                        # partial results survive an interrupted run
    report["uptime_after"] = uptime()
    report["complete"] = True
    print(f"load after: {report['uptime_after']}", flush=True)
    print("\n" + save())

if __name__ == "__main__":
    main()
