"""Human-readable rendering of manifests and verification results (the CLI's tables).

Everything here takes the manifest's JSON form, so ``peftc inspect`` needs neither torch nor any
backend; ``--json`` prints the manifest itself instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain text table with left-aligned columns."""
    cells = [[str(h) for h in headers], *[[_cell(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def verification_table(verification: Mapping[str, Any]) -> str:
    rows = []
    for case in verification["cases"]:
        sizes = ",".join(f"{k}={v}" for k, v in case["sizes"].items())
        for out in case["outputs"]:
            rows.append(
                [
                    case["oracle"],
                    sizes,
                    out["name"],
                    f"{out['max_abs']:.2e}",
                    f"{out['max_rel']:.2e}",
                    f"{'-' if out['tol_abs'] is None else format(out['tol_abs'], 'g')} / {out['tol_rel']:g}",
                    "ok" if out["ok"] else "FAIL " + out.get("note", ""),
                ]
            )
    text = table(["oracle", "sizes", "output", "max abs", "max rel", "tol abs / rel", "result"], rows)
    effect = verification.get("adapter_effect") or {}
    if effect:
        text += "\nadapter effect (max|adapted - base| / max|adapted|): " + ", ".join(
            f"{k} {v:.3g}" for k, v in effect.items()
        )
    return text


def manifest_text(m: Mapping[str, Any]) -> str:
    """``peftc inspect``: the manifest as sections of tables."""
    model = m["model"]
    parts = [
        f"artifact  status={m['status']}  peftc {m['peftc_version']}  created {m['created']}",
        table(
            ["model", "kind", "class", "parameters", "state sha256"],
            [[model["spec"], model["kind"], model["class"], f"{model['parameters']:,}", model["state_sha256"][:16]]],
        ),
        *([f"image size: {model['image_size']}"] if model.get("image_size") else []),
        *_adapter_parts(m),
        *_pipeline_parts(m["pipeline"]),
        *_files_parts(m["target"]),
        *_target_lines(m["target"]),
        *_precision_parts(m["target"].get("precision")),
        *_quantized_parts(m["target"]),
        *_density_parts(m["target"]),
        verification_table(m["verification"]),
        *(f"not run: {item['what']}: {item['reason']}" for item in m["not_run"]),
        *(f"warning: {warning}" for warning in _warnings(m)),
        "timings: " + ", ".join(f"{k} {v:.1f}s" for k, v in m["timings"].items()),
    ]
    if m.get("command"):
        parts.append("rebuild: " + " ".join(_quote(c) for c in m["command"]))
    return "\n\n".join(parts) + "\n"


def _adapter_parts(m: Mapping[str, Any]) -> list[str]:
    """The slots of a swappable artifact, then every adapter: its table, config and unused keys."""
    parts = []
    slots = m["target"].get("slots")
    if slots:
        bank = f", a bank of {slots['bank'] - 1} adapters per call" if slots.get("bank") else ""
        default = m["target"].get("default_adapter")
        stored = f", files {slots['slot_dtype']}" if slots.get("slot_dtype", "fp32") != "fp32" else ""
        parts.append(f"swappable: {_slot_kinds(slots)} ({slots['dtype']}{stored}){bank}; default adapter {default!r}")
        verified = {True: "add-adapter", False: "compile"}
        rows = [
            [
                a["name"],
                a["method"],
                len(a["sites"]),
                _ranks(a),
                a.get("slot_file", "-"),
                verified[bool(a.get("added"))],
            ]
            for a in m["adapters"]
        ]
        parts.append(table(["adapter", "method", "sites", "ranks", "slot file", "verified"], rows))
    for adapter in m["adapters"]:
        row = [adapter["name"], adapter["method"], len(adapter["sites"]), _ranks(adapter)]
        row += [len(adapter["replacements"]), adapter["sha256"]["weights"][:16]]
        parts.append(table(["adapter", "method", "sites", "ranks", "replaced tensors", "weights sha256"], [row]))
        set_fields = {k: v for k, v in adapter["config_honoured"].items() if v not in (None, [], {}, False, "none")}
        parts.append("  config: " + ", ".join(f"{k}={v}" for k, v in set_fields.items()))
        if adapter.get("base_model"):
            parts.append(f"  trained on: {adapter['base_model']} (base_model_name_or_path)")
        parts += [f"  unused key {key['key']}: {key['reason']}" for key in adapter.get("unused_keys", [])]
    combine = m.get("options", {}).get("combine")
    if combine:  # peftc compile --combine: what the adapter was made from
        inputs = ", ".join(f"{i['name']} ({i['sha256']['weights'][:16]})" for i in combine["inputs"])
        parts.append(f"  combined: {combine['spec']} ({combine['format']}) from {inputs}")
    return parts


def _warnings(m: Mapping[str, Any]) -> list[str]:
    """The compile's warnings, then those of adapters added later (``peftc add-adapter``)."""
    added = [w for a in m["adapters"] if a.get("added") for w in a.get("warnings", [])]
    return list(dict.fromkeys([*m["warnings"], *added]))


def _pipeline_parts(pipeline: Sequence[Mapping[str, Any]]) -> list[str]:
    """Every pass as it ran, then each pass's diagnostics."""
    rows = [
        [
            p["name"],
            p["modified"],
            _stats(p["stats"]),
            sum(d["kind"] == "skipped" for d in p["diagnostics"]),
            f"{p['seconds']:.2f}",
            f"{p['nodes_before']} -> {p['nodes_after']}",
        ]
        for p in pipeline
    ]
    parts = [table(["pass", "modified", "stats", "skipped", "seconds", "nodes"], rows)]
    for p in pipeline:
        parts += [f"  {p['name']}: {d['kind']} {d['site']}: {d['message']}" for d in p["diagnostics"]]
    return parts


def _files_parts(target: Mapping[str, Any]) -> list[str]:
    """The artifact's files, its inputs and outputs, and an ONNX model's size."""
    files = [[f["path"], f"{f['bytes']:,}", f["sha256"][:16]] for f in target["files"]]
    io_rows = [["input", v["name"], v["dtype"], _shape(v["shape"])] for v in target["inputs"]]
    io_rows += [["output", v["name"], v["dtype"], _shape(v["shape"])] for v in target["outputs"]]
    parts = [table(["file", "bytes", "sha256"], files), table(["", "name", "dtype", "shape"], io_rows)]
    if "opset" in target:
        fusions = ", ".join(f"{k} {v}" for k, v in (target.get("fusions") or {}).items())
        parts.append(
            f"target {target['name']}: opset {target['opset']}, {target['nodes']} nodes, "
            f"{target['initializers']} initializers ({target['initializer_bytes']:,} bytes)"
            + (f"; onnxruntime fusions: {fusions}" if fusions else "")
        )
    return parts


def _quantized_parts(target: Mapping[str, Any]) -> list[str]:
    """The merge policy of each LoRA site on a quantized base (``peftc/quant/compiled.py``)."""
    rows = target.get("quantized_sites")
    if not rows:
        return []
    from peftc.quant.compiled import table as sites_table

    return ["quantized base, LoRA merge policy per site:\n" + sites_table(rows)]


def _target_lines(target: Mapping[str, Any]) -> list[str]:
    """The aoti and trt targets' own facts (package and constants; parse, profile, engine and refit map)."""
    lines = []
    if target["name"] == "aoti":
        lines.append(
            f"target aoti: {target['package']} for {target['device']}, {target['constants']} constants, "
            f"{len(target['adapter_constants'])} adapter constants"
            + (", frozen" if target.get("frozen") else "")
            + "".join(f", {n} oneDNN int8 {k}" for k, n in (target.get("int8_kernels") or {}).items() if n)
        )
    trt = target.get("tensorrt")
    if trt:
        parse = trt["parse"]
        settings = trt["settings"]
        lines.append(
            f"target trt: {trt['module']} {trt['version']}, precision {settings['precision']}, parsed "
            f"{parse['layers']} layers; engine: {trt['engine'] or trt.get('engine_missing') or 'none'}"
        )
        lines.append(
            table(
                ["profile input", "min", "opt", "max"],
                [[p["name"], _shape(p["min"]), _shape(p["opt"]), _shape(p["max"])] for p in trt["profile"]],
            )
        )
        refit = trt["refit_map"]
        lines.append(
            f"refit map: {len(refit['entries'])} weights, {len(refit['refused'])} refused; refittable engine "
            f"{_cell(settings['refit'])}, weights stripped {_cell(settings['strip_weights'])}"
        )
        for item in refit["refused"][:5]:
            lines.append(f"  refit refused {item['weight']}: {item['reason']}")
    return lines


def _precision_parts(precision: Mapping[str, Any] | None) -> list[str]:
    """What the artifact computes in, its budget, and an integer precision's layer table."""
    if not precision:
        return []
    line = f"precision {precision['compute']} ({precision['how']}; checkpoint {precision['checkpoint']})"
    if precision.get("budget") is not None:
        line += (
            f", error budget {precision['budget']:.3g} vs the fp32 oracles "
            f"({precision['budget_from']}, depth {precision['depth']})"
        )
    parts = [line + (f"\n  note: {precision['note']}" if precision.get("note") else "")]
    quantization = precision.get("quantization")
    if quantization:
        calibration = quantization["calibration"]
        source = (
            calibration["source"] if calibration["source"] != "generated" else f"generated, seed {calibration['seed']}"
        )
        parts.append(
            f"quantized {quantization['quantized']} of {len(quantization['layers'])} layers, "
            f"{quantization['kept_float']} kept in float; error on the calibration inputs "
            f"({calibration['batches']} batches, {source}) {quantization['error']:.2e}"
        )
        rows = [
            [layer["module"] or "-", layer["name"], layer["op"], _shape(layer["shape"]), layer["precision"],
             f"{layer['error_alone']:.2e}"]
            for layer in quantization["layers"]
        ]  # fmt: skip
        parts.append(table(["layer", "node", "op", "weight", "precision", "error quantized alone"], rows))
    return parts


def _density_parts(target: Mapping[str, Any]) -> list[str]:
    """The DEFT passes' budget and error, then one row per layer and pass (``peftc/density/compiled.py``)."""
    density = target.get("density")
    if not density:
        return []
    line = (
        f"density: {', '.join(density['passes'])}; {density['removed']} of {density['neurons']} MLP neurons removed; "
        f"error on {density['held_out_batches']} held-out batches {density['error']:.2e} (budget "
        f"{density['max_error']:.3g}, {density['budget_from']}; verified within it)"
    )
    if density.get("dead_threshold") is not None:  # GELU/SiLU: dead = |h| within it on every calibration row
        line += f"; dead threshold |h| <= {density['dead_threshold']:g} (means folded into down biases where present)"
    rows = [
        [r["name"], r["pass"], _cell(r["kept"]), f"{r['removed']}/{r['neurons']}" if "removed" in r else "-",
         f"{r['block_error']:.2e}" if "block_error" in r else "-", f"{r['error']:.2e}" if "error" in r else "-",
         r.get("why", "")]
        for r in density["layers"]
    ]  # fmt: skip
    return [line, table(["layer", "pass", "kept", "removed", "block error", "model error", "why not"], rows)]


def _stats(stats: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in stats.items()) or "-"


def _shape(shape: Sequence[Any]) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _cell(value: Any) -> str:
    return "yes" if value is True else "no" if value is False else str(value)


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def _slot_kinds(slots: Mapping[str, Any]) -> str:
    """``11 LoRA slots of rank 4, 4 S²FT slots of capacity 3-16``: each kind of slot, counted."""
    kinds = {"linear": "LoRA", "embedding": "LoRA", "s2ft_rows": "S²FT", "s2ft_columns": "S²FT", "sparse": "sparse"}
    found: dict[str, list[int]] = {}
    for slot in slots["slots"]:
        found.setdefault(kinds.get(slot["kind"], slot["kind"]), []).append(slot.get("capacity", 0))
    parts = []
    for kind, capacities in found.items():
        low, high = min(capacities), max(capacities)
        size = f"rank {slots['rank']}" if kind == "LoRA" else f"capacity {low}" + (f"-{high}" if high > low else "")
        parts.append(f"{len(capacities)} {kind} slots of {size}")
    return ", ".join(parts)


def _ranks(adapter: Mapping[str, Any]) -> str:
    """The distinct LoRA ranks of an adapter's sites, ``"-"`` for a method without ranks."""
    return ",".join(map(str, sorted({s["r"] for s in adapter["sites"] if s.get("r") is not None}))) or "-"


def load_pyplot() -> Any:
    """matplotlib's ``pyplot`` on the non-interactive Agg backend (for ``--plot`` options).

    Raises:
        UnsupportedError: matplotlib is not installed.
    """
    from peftc.errors import UnsupportedError

    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        raise UnsupportedError("--plot needs matplotlib (pip install 'peftc[plot]')") from None
    return pyplot
