"""The comparison table from what the steps left on disk: `table.json` (every number), `table.md` and a plot
of FD against seconds per sample with one curve per prior across step counts (a small SVG, no plotting
library needed)."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

from ldm.repro.steps import Plan

# (key in table.json, column heading in table.md)
COLUMNS = [("FD_fmnist", "FD_fmnist"), ("FID", "FID"), ("precision", "precision"), ("recall", "recall"),
           ("density", "density"), ("coverage", "coverage"), ("nll_bits", "NLL"),
           ("conditional_accuracy", "accuracy"), ("conditional_accuracy_guided", "accuracy, guided"),
           ("network_evaluations_per_sample", "network evaluations / sample"),
           ("seconds_per_sample", "seconds / sample"), ("training_steps", "training steps")]
TIMING_KEYS = ("seconds", "seconds_per_sample", "peak_memory_mb", "peak_memory_mb_per_sample", "timing")


def _read(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _settings(row: dict[str, Any], keys: list[str]) -> dict[str, Any]:
    return {k: row[k] for k in keys if k in row}


COST_KEYS = ("FD_fmnist", "FID", "seconds_per_sample", "network_evaluations_per_sample")


def curve_points(rows: list[dict[str, Any]], names: list[str]) -> list[dict[str, Any]]:
    """The points of an FD-against-cost curve: each evaluation row's settings `names`, its cost and its FD."""
    return [{**_settings(r, names), **{k: r.get(k) for k in COST_KEYS}} for r in rows]


def cost_curves(rows: list[dict[str, Any]], group_keys: list[str], along: str) -> dict[str, list[dict[str, Any]]]:
    """Evaluation rows as `svg_plot` curves: one per setting of `group_keys`, each point labelled by `along`."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(", ".join(f"{k}={r.get(k)}" for k in group_keys) or "samples", []).append(r)
    return {name: curve_points(rs, [along]) for name, rs in groups.items()}


def build_table(plan: Plan) -> dict[str, Any]:
    """Every row the finished steps allow: the data floor, each first stage's reconstructions, each prior."""
    spec, ev = plan.spec, plan.spec.evaluation
    rows: list[dict[str, Any]] = []
    floor = _read(plan.floor_json()) if ev.floor else None
    if floor:
        rows.append({"row": f"data: {ev.eval_split} split, one half against the other", "kind": "floor",
                     **floor["test_halves"]})
        rows.append({"row": f"data: {ev.eval_split} split against {floor['reference_split']}", "kind": "floor",
                     **floor["test_vs_train"]})
    mains = {k: _read(plan.eval_json(p)) for k, p in spec.priors.items()}
    for fs in spec.first_stages.values():
        for key, prior in spec.priors.items():
            main = mains[key]
            if prior.first_stage == fs.key and main and main.get("first_stage_reconstructions"):
                rows.append({"row": f"{fs.label}: reconstructions", "kind": "reconstructions", "first_stage": fs.key,
                             **main["first_stage_reconstructions"]})
                break
    sweeps: dict[str, list[dict[str, Any]]] = {}
    grids: dict[str, str] = {}
    for key, prior in spec.priors.items():
        main = mains[key]
        if not main or not main.get("rows"):
            continue
        first = main["rows"][0]
        ckpt = plan.prior_checkpoint(prior)
        row = {"row": prior.label, "kind": "prior", "prior": key, "first_stage": prior.first_stage,
               "checkpoint": str(ckpt), "num_samples": main.get("num_samples"),
               "training_steps": plan.state.global_step(ckpt) if ckpt else None, **first}
        if prior.guidance_scale is not None and len(main["rows"]) > 1:
            guided = main["rows"][1]
            row.update(conditional_accuracy_guided=guided.get("conditional_accuracy"), guided=guided)
        rows.append(row)
        steps = _read(plan.eval_json(prior, "steps")) if prior.sweep else None
        names = list(prior.sweep)
        points = steps["rows"] if steps and steps.get("rows") else [first]
        sweeps[key] = curve_points(points, names)
        if plan.grid_png(prior).exists():
            grids[key] = str(plan.grid_png(prior).relative_to(plan.out))
    return {"title": spec.title or spec.name, "config": spec.source,
            "evaluation": {"num_samples": ev.num_samples, "sweep_samples": ev.sweep_samples or ev.num_samples,
                           "batch_size": ev.batch_size, "seed": ev.seed, "features": ev.features,
                           "eval_split": ev.eval_split, "elbo_limit": ev.elbo_limit, "elbo_strata": ev.elbo_strata,
                           "preprocessing": "uint8"},
            "guidance": {k: p.guidance_scale for k, p in spec.priors.items()},
            "rows": rows, "sweeps": sweeps, "grids": grids, "plot": "fd_vs_seconds.svg",
            "reported": spec.reported,
            "timing": {"steps": {k: v["seconds"] for k, v in plan.state.data["steps"].items()}}}


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def markdown(table: dict[str, Any], command: str) -> str:
    used = [(k, h) for k, h in COLUMNS if any(r.get(k) is not None for r in table["rows"])]
    ev = table["evaluation"]
    lines = [f"# {table['title']}", "", f"Written by `{command}` from `{table['config']}`.", "",
             "| | " + " | ".join(h for _, h in used) + " |", "|---|" + "---|" * len(used)]
    for r in table["rows"]:
        lines.append(f"| {r['row']} | " + " | ".join(_cell(r.get(k)) for k, _ in used) + " |")
    guidance = ", ".join(f"{k} {g}" for k, g in table["guidance"].items() if g is not None)
    lines += ["", f"{ev['num_samples']} samples per prior (seed {ev['seed']}, classes in turn), scored against the "
              f"{ev['eval_split']} split with the `{ev['features']}` features after uint8 quantisation; precision / "
              "recall / density / coverage against as many reference images as samples. Priors at their default "
              "sampler settings without guidance; \"accuracy, guided\" with classifier-free guidance"
              + (f" ({guidance})" if guidance else "") + ". NLL: bits per latent dimension (per token for "
              "discrete latents)" + (f", over {ev['elbo_limit']} held-out items" if ev["elbo_limit"] else "")
              + "; n/a for a prior without a likelihood. The data rows are the floor: real images against real "
              "images."]
    if table["sweeps"]:
        lines += ["", f"## Cost against quality ({ev['sweep_samples']} samples per point)", "",
                  f"![FD against seconds per sample]({table['plot']})", "",
                  "| prior | setting | FD_fmnist | network evaluations / sample | seconds / sample |", "|---|---|---|---|---|"]
        for key, points in table["sweeps"].items():
            for p in points:
                setting = ", ".join(f"{k}={v}" for k, v in p.items()
                                    if k not in ("FD_fmnist", "FID", "seconds_per_sample",
                                                 "network_evaluations_per_sample")) or "default"
                lines.append(f"| {key} | {setting} | {_cell(p['FD_fmnist'])} | "
                             f"{_cell(p['network_evaluations_per_sample'])} | {_cell(p['seconds_per_sample'])} |")
    if table["grids"]:
        lines += ["", "## Samples (row k: class k)", ""]
        lines += [f"**{key}**\n\n![{key}]({path})\n" for key, path in table["grids"].items()]
    if table["reported"]:
        lines += ["", "## Reported in the paper, beside ours", "", "| metric | paper | ours |", "|---|---|---|"]
        ours = next((r for r in table["rows"] if r["kind"] == "prior"), {})
        for k, v in table["reported"].items():
            if k in ("source", "note"):
                continue
            lines.append(f"| {k} | {v} | {_cell(ours.get(k))} |")
        lines += [f"\nSource: {table['reported'].get('source', '')}. {table['reported'].get('note', '')}".rstrip()]
    return "\n".join(lines) + "\n"


def svg_plot(sweeps: dict[str, list[dict[str, Any]]], y_key: str = "FD_fmnist", width: int = 640,
             height: int = 420) -> str:
    """FD against seconds per sample (log scale), a polyline per prior, each point labelled with its setting."""
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]
    curves = {k: [p for p in pts if p.get(y_key) is not None and (p.get("seconds_per_sample") or 0) > 0]
              for k, pts in sweeps.items()}
    points = [p for pts in curves.values() for p in pts]
    left, right, top, bottom = 70, 150, 20, 50
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
           f'font-size="11"><rect width="{width}" height="{height}" fill="white"/>']
    if not points:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle">no points yet</text></svg>')
        return "\n".join(out)
    xs = [math.log10(p["seconds_per_sample"]) for p in points]
    ys = [p[y_key] for p in points]
    x0, x1 = math.floor(min(xs)), math.ceil(max(xs))
    x1 = x1 if x1 > x0 else x0 + 1
    y1 = max(ys) * 1.1 or 1.0
    pw, ph = width - left - right, height - top - bottom

    def px(x: float) -> float:
        return left + (math.log10(x) - x0) / (x1 - x0) * pw

    def py(y: float) -> float:
        return top + ph - y / y1 * ph

    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>')
    for e in range(x0, x1 + 1):
        x = left + (e - x0) / (x1 - x0) * pw
        out.append(f'<line x1="{x:.1f}" y1="{top + ph}" x2="{x:.1f}" y2="{top + ph + 4}" stroke="#444"/>'
                   f'<text x="{x:.1f}" y="{top + ph + 16}" text-anchor="middle">{10.0 ** e:g}</text>')
    for i in range(6):
        y = y1 * i / 5
        out.append(f'<line x1="{left - 4}" y1="{py(y):.1f}" x2="{left}" y2="{py(y):.1f}" stroke="#444"/>'
                   f'<text x="{left - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 12}" text-anchor="middle">seconds per sample (log scale)'
               '</text>')
    out.append(f'<text transform="translate(16 {top + ph / 2}) rotate(-90)" text-anchor="middle">{y_key}</text>')
    for i, (key, pts) in enumerate(curves.items()):
        colour = colours[i % len(colours)]
        pts = sorted(pts, key=lambda p: p["seconds_per_sample"])
        coords = " ".join(f"{px(p['seconds_per_sample']):.1f},{py(p[y_key]):.1f}" for p in pts)
        out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        for p in pts:
            x, y = px(p["seconds_per_sample"]), py(p[y_key])
            label = ",".join(str(v) for k, v in p.items() if k not in COST_KEYS)
            out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{colour}"/>')
            if label:
                out.append(f'<text x="{x + 4:.1f}" y="{y - 4:.1f}" fill="{colour}">{html.escape(label)}</text>')
        ly = top + 14 + 16 * i
        out.append(f'<line x1="{left + pw + 10}" y1="{ly - 4}" x2="{left + pw + 28}" y2="{ly - 4}" stroke="{colour}" '
                   f'stroke-width="2"/><text x="{left + pw + 32}" y="{ly}">{html.escape(key)}</text>')
    out.append("</svg>")
    return "\n".join(out)


def write_table(plan: Plan, command: str) -> dict[str, Any]:
    """Write table.json, table.md and the plot into the results folder; the table."""
    from ldm.repro.steps import atomic_write

    table = build_table(plan)
    y_key = "FID" if plan.spec.evaluation.features == "inception" else "FD_fmnist"
    atomic_write(plan.out / table["plot"], svg_plot(table["sweeps"], y_key))
    atomic_write(plan.out / "table.json", json.dumps(table, indent=2))
    atomic_write(plan.out / "table.md", markdown(table, command))
    return table


def comparable(table: dict[str, Any]) -> Any:
    """The table without what depends on the machine's speed or the paths (wall times, seconds and memory per
    sample, checkpoint paths): what two runs of the same reproduction must agree on."""
    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in TIMING_KEYS and k not in ("checkpoint", "config")}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return strip(table)
