"""Merge the GPU suite's outputs in OUTDIR into results.json and results.md (tables for docs/benchmarks.md).

    python benchmarks/gpu_suite_report.py OUTDIR

Reads what benchmarks/gpu_suite.sh left there: the STEP lines of suite.log, pytest.xml / pytest.log,
scan.json (benchmarks/selective_scan.py) and throughput.json (benchmarks/model_throughput.py); any of
them may be missing when a step failed or ran out of time, and the report then says so. After writing
results.json, which contains everything, the three intermediate files are removed (the device tool
returns at most 8 files from an output folder).
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any, Dict, List, Optional

SCAN_HEADER = ("| backend | model | dtype | stage | D | L | fwd ms | fwd % copy bw | bwd ms | bwd % copy bw "
               "| fwd+bwd ms |\n|---|---|---|---|---|---|---|---|---|---|---|")
TP_HEADER = ("| model | scan | deform | train img/s | infer AMP img/s | infer fp32 img/s | peak train mem GiB |\n"
             "|---|---|---|---|---|---|---|")


def read_json(path: Path) -> Optional[Dict[str, Any]]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def read_steps(log: Path) -> List[Dict[str, Any]]:
    """The `STEP<TAB>name<TAB>rc<TAB>seconds<TAB>note` lines of suite.log."""
    steps = []
    if log.is_file():
        for line in log.read_text(errors="replace").splitlines():
            parts = line.split("\t")
            if parts[0] == "STEP" and len(parts) == 5:
                steps.append({"step": parts[1], "rc": parts[2], "seconds": parts[3], "note": parts[4]})
    return steps


def read_pytest(xml_path: Path, log_path: Path) -> Optional[Dict[str, Any]]:
    """Counts, failures and skip reasons from the JUnit XML; the summary line from the log."""
    summary = None
    if log_path.is_file():
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines() if ln.strip()]
        last = lines[-1].strip("= ") if lines else ""
        finished = any(word in last for word in ("passed", "failed", "skipped", "error", "no tests ran"))
        summary = last if finished else "no summary: pytest did not finish (see pytest.log)"
    if not xml_path.is_file():
        return {"summary": summary} if summary else None
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError:
        return {"summary": summary, "error": "pytest.xml is not valid XML"}
    cases = root.iter("testcase")
    result: Dict[str, Any] = {"summary": summary, "passed": 0, "failed": [], "skipped": []}
    for case in cases:
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None or case.find("error") is not None:
            node = case.find("failure") if case.find("failure") is not None else case.find("error")
            result["failed"].append({"test": name, "message": (node.get("message") or "")[:300]})
        elif case.find("skipped") is not None:
            result["skipped"].append({"test": name, "reason": (case.find("skipped").get("message") or "")[:300]})
        else:
            result["passed"] += 1
    return result


def _num(value: Optional[float], spec: str) -> str:
    return "—" if value is None else format(value, spec)


def scan_table(scan: Dict[str, Any]) -> List[str]:
    env = scan["environment"]
    target = scan.get("target", {})
    lines = [f"Selective scan, {env['device']}, torch {env['torch']}, batch {scan['results'][0]['batch']}"
             if scan.get("results") else f"Selective scan, {env['device']}, torch {env['torch']}",
             f"(copy bandwidth {scan['copy_bandwidth_GBps']:.0f} GB/s read + write; median of {scan['repeats']} "
             f"after {scan['warmup']} warm-up; target at stage {target.get('stage')}: fwd >= "
             f"{target.get('fwd_pct_copy_bw')} %, bwd >= {target.get('bwd_pct_copy_bw')} % of copy bandwidth):", "",
             SCAN_HEADER]
    for r in scan.get("results", []):
        if "error" in r:
            lines.append(f"| {r['backend']} | {r['model']} | {r['dtype']} | {r['stage']} | {r['D']} | {r['L']} | "
                         f"{r['error']} | | | | |")
            continue
        lines.append(f"| {r['backend']} | {r['model']} | {r['dtype']} | {r['stage']} | {r['D']} | {r['L']} | "
                     f"{r['fwd_ms']:.3f} | {r['fwd_pct_copy_bw']:.1f} | {r['bwd_ms']:.3f} | "
                     f"{r['bwd_pct_copy_bw']:.1f} | {r['fwd_bwd_ms']:.3f} |")
    for backend, status in scan.get("backend_status", {}).items():
        if status != "measured":
            lines.append(f"\n{backend}: {status}")
    return lines


def throughput_table(tp: Dict[str, Any]) -> List[str]:
    env, s = tp["environment"], tp["settings"]
    lines = [f"Model throughput, {env['device']}, torch {env['torch']}, batch {s['batch_size']}, {s['img_size']} px, "
             f"{s['amp_dtype']} AMP training (GradScaler, clip {s['clip_grad']}, AdamW), median of {s['steps']} "
             f"steps after {s['warmup']} warm-up"
             + ("" if tp.get("comparable_to_official") else " (settings differ from the official measurement)")
             + ":", "", TP_HEADER]
    official, targets = tp.get("official", {}), tp.get("targets", {})
    if tp.get("comparable_to_official"):
        for variant in official:
            o, t = official[variant], targets[variant]
            lines.append(f"| {variant} (official) | | | {o['train_img_s']} | {o['infer_amp_img_s']} | "
                         f"{o['infer_fp32_img_s']} | {o['train_mem_gib']} |")
            lines.append(f"| {variant} (target) | | | >= {t['train_img_s']} | >= {t['infer_amp_img_s']} | | "
                         f"<= {t['train_mem_gib']} |")
    notes = []
    for r in tp.get("results", []):
        if r.get("status") != "measured":
            notes.append(f"{r['model']} scan={r['scan_backend']} deform={r['deform_backend']}: {r.get('status')}")
            continue
        lines.append(f"| {r['model']} | {r['scan_backend']} | {r['deform_backend']} | {r['train_img_s']:.1f} | "
                     f"{r['infer_amp_img_s']:.1f} | {r['infer_fp32_img_s']:.1f} | {_num(r['train_mem_gib'], '.2f')} |")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    for r in tp.get("results", []):
        top = r.get("profile", {}).get("top")
        if top:
            lines += ["", f"Top kernels of one training step, {r['model']} scan={r['scan_backend']} "
                          f"deform={r['deform_backend']} (sorted by {r['profile']['sorted_by']}):", "",
                      "| kernel | calls | self ms | % |", "|---|---|---|---|"]
            lines += [f"| `{k['name'][:90]}` | {k['calls']} | {k['self_ms']:.2f} | {k['pct']:.1f} |" for k in top[:15]]
            break  # one profile in the markdown; all are in results.json
    return lines


def main(argv: List[str]) -> int:
    if len(argv) != 1:
        print("usage: python benchmarks/gpu_suite_report.py OUTDIR", file=sys.stderr)
        return 2
    out = Path(argv[0])
    if not out.is_dir():
        print(f"error: {out} is not a folder", file=sys.stderr)
        return 2
    steps = read_steps(out / "suite.log")
    pytest_result = read_pytest(out / "pytest.xml", out / "pytest.log")
    scan = read_json(out / "scan.json")
    tp = read_json(out / "throughput.json")
    env = (tp or scan or {}).get("environment")
    results = {"steps": steps, "environment": env, "pytest": pytest_result, "selective_scan": scan,
               "model_throughput": tp}

    md = ["### GPU suite run", ""]
    if env:
        md.append(f"{env['device']} (compute capability {env.get('capability', '?')}), torch {env['torch']}, "
                  f"CUDA {env['cuda']}, Triton {env['triton']}, Python {env['python']}; CUDA scan extension "
                  f"built: {env['scan_cuda_extension']}.")
    md += ["", "| step | exit | seconds | result |", "|---|---|---|---|"]
    md += [f"| {s['step']} | {s['rc']} | {s['seconds']} | {s['note']} |" for s in steps]
    summary = (pytest_result or {}).get("summary")
    md += ["", f"Tests: {summary or 'not run'}"]
    for f in (pytest_result or {}).get("failed", []):
        md.append(f"- FAILED `{f['test']}`: {f['message']}")
    for s in (pytest_result or {}).get("skipped", []):
        md.append(f"- skipped `{s['test']}`: {s['reason']}")
    md += [""] + (scan_table(scan) if scan else ["Selective scan: no figures (step failed or did not run)."])
    md += [""] + (throughput_table(tp) if tp else ["Model throughput: no figures (step failed or did not run)."])

    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text("\n".join(md) + "\n")
    for name in ("pytest.xml", "scan.json", "throughput.json"):
        (out / name).unlink(missing_ok=True)
    print(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
