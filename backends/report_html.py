"""report.html: one self-contained page (inline CSS and SVG, no scripts, no network) about a package."""

from __future__ import annotations

import html

ENGINE_COLOURS = {"drpai": "#2b8cbe", "cpu": "#f16913"}
REGION_COLOURS = {"data_in": "#74c476", "data": "#6baed6", "data_out": "#fd8d3c", "weight": "#9e9ac8", "work": "#bdbdbd"}


def render_report(descriptor: dict, report: dict) -> str:
    """The HTML page for a package: summary, pipeline, placement, memory map, per-layer charts."""
    t = descriptor["totals"]
    target = descriptor["target"]
    measured = descriptor["provenance"]["accuracy_measured"]
    parts = [
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>",
        f"<title>drpc report: {_e(target['name'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>drpc package for {_e(target['name'])} <small>({_e(str(target.get('accelerator', '')))}, "
        f"{_e(str(target.get('precision', '')))})</small></h1>",
        "" if measured else "<p class='warn'>Calibrated on synthetic inputs: accuracy is UNMEASURED.</p>",
        "".join(f"<p class='warn'>{_e(w)}</p>" for w in descriptor.get("warnings", [])),
        "<section><h2>Summary</h2><table class='kv'>",
        _kv("Model", descriptor["provenance"].get("model_path", "")),
        _kv("Layers on DRP-AI / CPU", f"{t['layers_on_drpai']} / {t['layers_on_cpu']}"),
        *_counts(t, _pruned(report)),
        _kv("DRP-AI memory", f"{_mib(t['memory_bytes'])} (activations {_mib(t['activation_bytes'])}, "
                             f"{_mib(t['activation_bytes_no_reuse'])} without reuse)"),
        _kv("Estimated latency", f"{t['estimated_latency_ms']:.3f} ms" if t.get("estimated_latency_ms") is not None else "-"),
        "</table></section>",
        _pipeline_section(descriptor, report),
        _pruning_section(descriptor) if _pruned(report) else "",
        _placement_section(descriptor),
        _memory_section(descriptor),
        _layer_charts(descriptor),
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p)


def _pipeline_section(descriptor, report) -> str:
    rows = []
    for i, p in enumerate(report.get("passes", []), 1):
        facts = {k: v for k, v in p.items() if k not in ("name", "changed", "seconds", "phase_seconds")}
        facts_text = _e(", ".join(f"{k}={_short(v)}" for k, v in facts.items()))
        if p.get("phase_seconds"):  # where the pass's time went
            facts_text = ("<small>" + _e(" · ".join(f"{k} {v:.2f}s" for k, v in p["phase_seconds"].items()))
                          + "</small><br>" + facts_text)
        rows.append(f"<tr class='{'changed' if p['changed'] else 'same'}'><td>{i:03d}</td><td>{_e(p['name'])}</td>"
                    f"<td>{'changed' if p['changed'] else '-'}</td><td>{p['seconds']:.3f}s</td><td>{facts_text}</td></tr>")
    return (f"<section><h2>Pipeline</h2><p><code>{_e(descriptor['provenance']['pipeline'])}</code></p>"
            "<table><tr><th>#</th><th>pass</th><th>IR</th><th>time</th><th>what it did</th></tr>"
            + "".join(rows) + "</table></section>")


def _pruned(report) -> bool:
    return any(p["name"] == "prune" and p["changed"] for p in report.get("passes", []))


def _counts(t, pruned: bool) -> list[str]:
    if not pruned:
        return [_kv("MACs", f"{t['macs']:,}"), _kv("Parameters", f"{t['params']:,}")]
    return [_kv(f"{label} before pruning → non-zero after", before_after(t, key))
            for label, key in (("MACs", "macs"), ("Parameters", "params"))]


def before_after(totals: dict, key: str, after_label: str = "") -> str:
    """'5,791,744 → 2,247,336 (-61.2%)': `key` ("macs" or "params") before pruning → non-zero in the package."""
    before, after = totals[f"{key}_before"], totals[f"nonzero_{key}"]
    return f"{before:,} → {after:,}{after_label} ({_change(before, after)})"


def _pruning_section(descriptor) -> str:
    """One row per layer that pruning changed: weights and MACs before → after, channels, refit error."""
    rows = []
    for l in descriptor["layers"]:
        before = l.get("params_before", 0)
        touched = any(k in l for k in ("sparsity", "channels_after", "sequential_refit"))
        if not before or not (touched or l["macs"] != l.get("macs_before", l["macs"])):
            continue
        channels = (f"{l['channels_before']} → {l['channels_after']}" if "channels_after" in l else "-")
        if "heads_after" in l:
            channels += f" (heads {l['heads_before']} → {l['heads_after']})"
        refit = l.get("sequential_refit") or {}
        error = (f"{max(refit['error_before'], 0):.4f} → {max(refit['error_after'], 0):.4f}"
                 if "error_after" in refit else "-")
        rows.append(f"<tr><td>{_e(_layer_label(l))}</td><td>{_e(l['op'])}</td>"
                    f"<td>{before:,} → {l['nonzero_params']:,}</td><td>{_change(before, l['nonzero_params'])}</td>"
                    f"<td>{l.get('macs_before', 0):,} → {l['nonzero_macs']:,}</td><td>{l['weight_sparsity']:.1%}</td>"
                    f"<td>{channels}</td><td>{error}</td></tr>")
    return ("<section><h2>Pruning</h2>"
            "<p class='note'>Per pruned layer: parameters and MACs in the float model before pruning → non-zero in the "
            "package (what a zero-skipping engine computes). Refit error: on the calibration data, with the pruned "
            "model's own inputs, the layer's squared error against the float model's output relative to that "
            "output's variance, before → after its least-squares refit.</p>"
            "<table><tr><th>layer</th><th>op</th><th>params</th><th>change</th><th>MACs</th><th>weight sparsity</th>"
            "<th>channels</th><th>refit error</th></tr>" + "".join(rows) + "</table></section>")


def _change(before: int, after: int) -> str:
    return f"{(after - before) / max(before, 1):+.1%}"


def _placement_section(descriptor) -> str:
    layers = descriptor["layers"]
    if not layers:
        return ""
    width, bar_h = 960, 36
    step = width / len(layers)
    rects = []
    for i, layer in enumerate(layers):
        colour = ENGINE_COLOURS.get(layer["engine"], "#999")
        tip = f"{_layer_label(layer)}, {layer['op']} on {layer['engine']}" + (
            f": {layer['cpu_reason']}" if layer.get("cpu_reason") else "")
        rects.append(f"<rect x='{i * step:.2f}' y='0' width='{max(step, 0.5):.2f}' height='{bar_h}' "
                     f"fill='{colour}'><title>{_e(tip)}</title></rect>")
    legend = " ".join(f"<span class='chip' style='background:{c}'></span>{e}" for e, c in ENGINE_COLOURS.items())
    cpu_rows = "".join(f"<tr><td>{_e(_layer_label(l))}</td><td>{_e(l['op'])}</td><td>{_e(l.get('cpu_reason', ''))}</td></tr>"
                       for l in layers if l["engine"] == "cpu")
    subgraphs = descriptor.get("subgraphs", [])
    return ("<section><h2>Placement</h2>"
            f"<p>{len(subgraphs)} subgraphs, {len(descriptor.get('transfers', []))} transfers between engines. {legend}</p>"
            f"<svg class='strip' viewBox='0 0 {width} {bar_h}' width='{width}' height='{bar_h}' role='img' "
            f"aria-label='layers in execution order coloured by engine'>{''.join(rects)}</svg>"
            "<p class='note'>Layers in execution order, left to right.</p>"
            + (f"<table><tr><th>CPU layer</th><th>op</th><th>why</th></tr>{cpu_rows}</table>" if cpu_rows else "")
            + "</section>")


def _memory_section(descriptor) -> str:
    tensors = [t for t in descriptor["tensors"] if t["region"] in ("data", "data_in", "data_out") and t["size"] > 0]
    regions = descriptor["memory"]["regions"]
    if not tensors:
        return ""
    width, height = 960, 320
    steps = max(max(t["lifetime"][1] for t in tensors), 1) + 1
    lo = min(t["offset"] for t in tensors)
    hi = max(t["offset"] + t["size"] for t in tensors)
    span = max(hi - lo, 1)
    rects = []
    for t in tensors:
        x = t["lifetime"][0] / steps * width
        w = max((t["lifetime"][1] - t["lifetime"][0] + 1) / steps * width, 1.0)
        y = (t["offset"] - lo) / span * height
        h = max(t["size"] / span * height, 1.0)
        colour = REGION_COLOURS.get(t["region"], "#999")
        rects.append(f"<rect x='{x:.1f}' y='{y:.1f}' width='{w:.1f}' height='{h:.1f}' fill='{colour}' "
                     f"stroke='#fff' stroke-width='0.5'><title>{_e(t['name'])}: {t['size']:,} B at "
                     f"{hex(t['offset'])}, steps {t['lifetime'][0]}-{t['lifetime'][1]}</title></rect>")
    region_rows = "".join(f"<tr><td><span class='chip' style='background:{REGION_COLOURS.get(r['name'], '#999')}'></span>"
                          f"{_e(r['name'])}</td><td>{hex(r['base'])}</td><td>{r['size']:,}</td><td>{r['alignment']}</td></tr>"
                          for r in regions)
    return ("<section><h2>Memory map</h2>"
            f"<svg class='memory' viewBox='0 0 {width} {height}' width='{width}' height='{height}' role='img' "
            f"aria-label='activation memory: address against time'>{''.join(rects)}</svg>"
            "<p class='note'>Each box is a tensor: horizontal = when it is alive (layer steps), vertical = where it "
            "lives (address). Boxes never overlap: tensors share memory only when their lifetimes do not.</p>"
            "<table><tr><th>region</th><th>base</th><th>bytes</th><th>alignment</th></tr>" + region_rows +
            "</table></section>")


def _layer_charts(descriptor) -> str:
    layers = descriptor["layers"]
    charts = []
    for key, title, unit in (("quant_sqnr_db", "Quantization SQNR per layer (higher is better)", " dB"),
                             ("weight_sparsity", "Weight sparsity per layer", ""),
                             ("latency_us", "Estimated latency per layer", " µs")):
        values = [(l.get("pytorch_module") or l["name"], l.get(key)) for l in layers
                  if isinstance(l.get(key), (int, float)) and (key != "weight_sparsity" or l["params"] > 0)]
        if values:
            charts.append(_bar_chart(title, values, unit))
    return "<section><h2>Per layer</h2>" + "".join(charts) + "</section>" if charts else ""


def _bar_chart(title: str, values: list[tuple[str, float]], unit: str) -> str:
    row_h, label_w, bar_w = 16, 260, 560
    top = max(max(abs(v) for _, v in values), 1e-12)
    rows = []
    for i, (name, v) in enumerate(values):
        y = i * row_h
        w = abs(v) / top * bar_w
        rows.append(f"<text x='{label_w - 6}' y='{y + 12}' text-anchor='end'>{_e(name[-38:])}</text>"
                    f"<rect x='{label_w}' y='{y + 2}' width='{w:.1f}' height='{row_h - 4}' fill='#4292c6'/>"
                    f"<text x='{label_w + w + 4:.1f}' y='{y + 12}'>{v:.3g}{unit}</text>")
    height = row_h * len(values)
    return (f"<h3>{_e(title)}</h3><svg class='bars' viewBox='0 0 {label_w + bar_w + 90} {height}' "
            f"width='{label_w + bar_w + 90}' height='{height}'>{''.join(rows)}</svg>")


def _layer_label(layer: dict) -> str:
    """A layer's node name, and the PyTorch module it came from when the exporter recorded one."""
    module = layer.get("pytorch_module")
    return f"{layer['name']} ({module})" if module else layer["name"]


def _kv(key, value) -> str:
    return f"<tr><th>{_e(key)}</th><td>{_e(str(value))}</td></tr>"


def _mib(n) -> str:
    return f"{n / 2**20:.2f} MiB"


def _short(v) -> str:
    text = str(v)
    return text if len(text) <= 80 else text[:77] + "..."


def _e(text) -> str:
    return html.escape(str(text), quote=True)


_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;max-width:1040px}
h1 small{color:#666;font-weight:normal}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
tr.same{color:#888}.warn{background:#fff3cd;border:1px solid #e0c060;padding:6px 10px}
.chip{display:inline-block;width:12px;height:12px;margin:0 4px 0 10px;vertical-align:middle}
.note{color:#666;font-size:12px}svg{display:block;border:1px solid #eee;margin:6px 0}
svg.bars text{font-size:11px}code{background:#f4f4f4;padding:2px 4px;word-break:break-all}
"""
