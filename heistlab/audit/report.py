"""The audit's report: ``report.md`` and a self-contained ``report.html`` (figures inlined), the figures as
PNG files, and ``findings.json`` for machines.

For each finding: what was tried, what happened, its figures and its severity with the reason; then the
queries each battery member spent and the configuration audited. Figures (matplotlib, Agg backend):

- ``fidelity.png``: fidelity reached against thousands of queries, one curve per extraction attack;
- ``evasion.png``: success rate of each evasion attack, with its queries;
- ``refusals.png``: per probe, the requests answered (2xx), refused (4xx) and failed (5xx);
- ``detection.png``: queries to detection per extraction attack, when alarms were observable.
"""

from __future__ import annotations

import base64
import datetime
import html
import json
import os
from collections.abc import Mapping
from pathlib import Path

from heistlab.audit.findings import SEVERITIES, Finding, failing, worst

COLOURS = {"info": "#6c757d", "low": "#0d6efd", "medium": "#fd7e14", "high": "#dc3545", "critical": "#6f0000"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    _pyplot().close(figure)
    return path


def fidelity_figure(findings, out_dir: Path) -> Path | None:
    curves = {
        item.check: item.figures["fidelity_curve"] for item in findings if "fidelity_curve" in item.figures
    }
    if not curves:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 3.6))
    for check, curve in curves.items():
        queries, values = zip(*curve, strict=True)
        axes.plot([count / 1000 for count in queries], values, marker="o", label=check.split(".", 1)[1])
    axes.set(xlabel="queries (thousands)", ylabel="fidelity (top-1 agreement)", ylim=(0, 1.02))
    axes.set_title("Fidelity reached per 1000 queries")
    axes.grid(alpha=0.3)
    axes.legend()
    return _save(figure, out_dir / "fidelity.png")


def evasion_figure(findings, out_dir: Path) -> Path | None:
    rows = [
        item
        for item in findings
        if item.category == "evasion" and item.figures.get("success_rate") is not None
    ]
    if not rows:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 3.2))
    names = [f"{item.check.split('.', 1)[1]}: {item.title.removeprefix('Evasion: ')}" for item in rows]
    rates = [item.figures["success_rate"] for item in rows]
    bars = axes.bar(names, rates, color=[COLOURS[item.severity] for item in rows])
    for bar, item in zip(bars, rows, strict=True):
        label = f"{item.figures.get('evasion_queries', 0)} queries"
        axes.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    axes.set(ylabel="success rate", ylim=(0, 1.1), title="Evasion through the API (transfer and black box)")
    return _save(figure, out_dir / "evasion.png")


def refusals_figure(findings, out_dir: Path) -> Path | None:
    rows = []
    for item in findings:
        statuses = item.figures.get("statuses")
        if isinstance(statuses, Mapping) and statuses:
            codes = [int(code) for code in statuses.values()]
            rows.append((item.check, codes))
        elif isinstance(item.figures.get("status_counts"), Mapping):
            counts = item.figures["status_counts"]
            rows.append((item.check, [int(code) for code, n in counts.items() for _ in range(n)]))
    if not rows:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.2))
    labels = [check for check, _ in rows]
    groups = (("answered (2xx)", 200, 300, "#198754"), ("refused (4xx)", 400, 500, "#adb5bd"))
    groups += (("failed (5xx)", 500, 600, "#dc3545"),)
    left = [0] * len(rows)
    for name, low, high, colour in groups:
        counts = [sum(low <= code < high for code in codes) for _, codes in rows]
        axes.barh(labels, counts, left=left, color=colour, label=name)
        left = [a + b for a, b in zip(left, counts, strict=True)]
    axes.invert_yaxis()
    axes.set(xlabel="requests", title="Probe requests: answered, refused, failed")
    axes.legend(loc="lower right", fontsize="small")
    return _save(figure, out_dir / "refusals.png")


def detection_figure(findings, out_dir: Path) -> Path | None:
    monitoring = next((item for item in findings if item.check == "detection.monitoring"), None)
    if monitoring is None or not monitoring.tested:
        return None
    detected = monitoring.figures.get("detected", {})
    if not detected:
        return None
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 3))
    queries = monitoring.figures.get("queries_to_detection", {})
    names = list(detected)
    values = [queries.get(name) or 0 for name in names]
    bars = axes.bar(names, values, color=["#198754" if detected[name] else "#adb5bd" for name in names])
    for bar, name in zip(bars, names, strict=True):
        text = f"{queries.get(name)}" if detected[name] else "not detected"
        axes.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom")
    axes.set(ylabel="queries to detection", title="Detection of each extraction attack")
    axes.set_ylim(0, max(*values, 1) * 1.2)
    return _save(figure, out_dir / "detection.png")


def write_figures(findings, out_dir: Path) -> dict[str, Path]:
    makers = {
        "fidelity": fidelity_figure,
        "evasion": evasion_figure,
        "refusals": refusals_figure,
        "detection": detection_figure,
    }
    made = {name: maker(findings, out_dir) for name, maker in makers.items()}
    return {name: path for name, path in made.items() if path is not None}


def figure_text(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping | list | tuple):
        return json.dumps(value, default=str)
    return str(value)


def verdict(result) -> str:
    gate = failing(result.findings, result.fail_on)
    highest = worst(result.findings) or "none"
    if result.fail_on == "never":
        return f"REPORT ONLY (worst present: {highest})"
    state = "FAIL" if gate else "PASS"
    return (
        f"{state}: worst present finding {highest}; audit.fail_on={result.fail_on}, {len(gate)} at or above"
    )


def presence(item: Finding) -> str:
    return "yes" if item.present else ("not tested" if not item.tested else "no")


def inline(path: Path) -> str:
    return base64.b64encode(path.read_bytes()).decode()


def markdown(result, figures: dict[str, Path], when: str) -> str:
    lines = [
        f"# Security audit of {result.target}",
        "",
        f"{when}; {result.seconds:.1f} s; {sum(result.spent.values())} of {result.budget} query rows spent.",
        "",
        f"**Verdict: {verdict(result)}**",
        "",
        "| severity | check | finding | present |",
        "|---|---|---|---|",
    ]
    for item in result.findings:
        lines.append(f"| {item.severity} | `{item.check}` | {item.title} | {presence(item)} |")
    lines += ["", "## Figures", ""]
    lines += [f"![{name}]({path.name})" for name, path in figures.items()] or ["(none)"]
    lines += ["", "## Findings", ""]
    for item in result.findings:
        lines += [
            f"### [{item.severity.upper()}] {item.title} (`{item.check}`)",
            "",
            f"- **Tried:** {item.tried}",
            f"- **Happened:** {item.happened}",
            f"- **Severity:** {item.severity}: {item.reason}",
        ]
        if item.figures:
            lines += ["", "| figure | value |", "|---|---|"]
            lines += [f"| {name} | {figure_text(value)} |" for name, value in item.figures.items()]
        lines.append("")
    lines += ["## Queries spent", "", "| member | rows |", "|---|---:|"]
    lines += [f"| {member} | {rows} |" for member, rows in result.spent.items()]
    lines += [
        "",
        "## Configuration audited",
        "",
        "```json",
        json.dumps(result.configuration, indent=2, default=str),
    ]
    lines += ["```", ""]
    return "\n".join(lines)


def html_report(result, figures: dict[str, Path], when: str) -> str:
    escape = html.escape
    rows = "".join(
        f"<tr><td><span class='sev {item.severity}'>{item.severity}</span></td>"
        f"<td><code>{escape(item.check)}</code></td><td>{escape(item.title)}</td><td>{presence(item)}</td></tr>"
        for item in result.findings
    )
    images = "".join(
        f"<figure><img alt='{name}' src='data:image/png;base64,{inline(path)}'>"
        f"<figcaption>{name}</figcaption></figure>"
        for name, path in figures.items()
    )
    sections = []
    for item in result.findings:
        table = "".join(
            f"<tr><td>{escape(name)}</td><td><code>{escape(figure_text(value))}</code></td></tr>"
            for name, value in item.figures.items()
        )
        sections.append(
            f"<section><h3><span class='sev {item.severity}'>{item.severity}</span> {escape(item.title)} "
            f"<code>{escape(item.check)}</code></h3><p><b>Tried:</b> {escape(item.tried)}</p>"
            f"<p><b>Happened:</b> {escape(item.happened)}</p><p><b>Severity:</b> {item.severity}: "
            f"{escape(item.reason)}</p>{f'<table>{table}</table>' if table else ''}</section>"
        )
    spent = "".join(
        f"<tr><td>{escape(member)}</td><td>{rows}</td></tr>" for member, rows in result.spent.items()
    )
    colours = "".join(f".sev.{name}{{background:{colour}}}" for name, colour in COLOURS.items())
    configuration = escape(json.dumps(result.configuration, indent=2, default=str))
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        f"<title>Security audit of {escape(result.target)}</title><style>"
        "body{font-family:sans-serif;max-width:60em;margin:2em auto;padding:0 1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}"
        ".sev{color:#fff;border-radius:.3em;padding:0 .4em;font-size:.85em}"
        f"{colours}img{{max-width:100%}}pre{{background:#f6f8fa;padding:1em;overflow:auto}}</style></head><body>"
        f"<h1>Security audit of {escape(result.target)}</h1><p>{escape(when)}; {result.seconds:.1f} s; "
        f"{sum(result.spent.values())} of {result.budget} query rows spent.</p>"
        f"<p><b>Verdict: {escape(verdict(result))}</b></p>"
        f"<table><tr><th>severity</th><th>check</th><th>finding</th><th>present</th></tr>{rows}</table>"
        f"<h2>Figures</h2>{images or '<p>(none)</p>'}<h2>Findings</h2>{''.join(sections)}"
        f"<h2>Queries spent</h2><table><tr><th>member</th><th>rows</th></tr>{spent}</table>"
        f"<h2>Configuration audited</h2><pre>{configuration}</pre></body></html>"
    )


def finding_record(item: Finding) -> dict:
    return {**item._asdict(), "figures": dict(item.figures), "category": item.category}


def write_report(result, out_dir: Path) -> dict[str, Path]:
    """Writes the report files to ``out_dir``; returns their paths by kind."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    figures = write_figures(result.findings, out_dir)
    record = {
        "target": result.target,
        "verdict": verdict(result),
        "fail_on": result.fail_on,
        "worst": worst(result.findings),
        "severities": list(SEVERITIES),
        "budget": result.budget,
        "spent": result.spent,
        "seconds": result.seconds,
        "findings": [finding_record(item) for item in result.findings],
        "configuration": result.configuration,
    }
    paths = {
        "markdown": out_dir / "report.md",
        "html": out_dir / "report.html",
        "json": out_dir / "findings.json",
    }
    contents = {
        "markdown": markdown(result, figures, when),
        "html": html_report(result, figures, when),
        "json": json.dumps(record, indent=2, default=str),
    }
    for kind, path in paths.items():
        temporary = path.with_name(f".{path.name}.{os.getpid()}")
        temporary.write_text(contents[kind])
        os.replace(temporary, path)
    return {**paths, **{f"figure:{name}": path for name, path in figures.items()}}
