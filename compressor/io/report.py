"""Human-readable and JSON reports: bytes by component, formats, time, memory, fallbacks."""

from __future__ import annotations

from dataclasses import asdict

from .accounting import bytes_by_component


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_report(model_dir, original, predicted, blocks, dense, plan, layer_reports, seconds) -> dict:
    exp, den = [b.name + "." for b in blocks], [d + "." for d in dense]
    return {
        "model": str(model_dir),
        "bytes_original": bytes_by_component(original, exp, den),
        "bytes_compressed": bytes_by_component(predicted, exp, den),
        "total_original": sum(original.values()),
        "total_compressed": plan.predicted_bytes,
        "formats": plan.format_counts(),
        "seconds": round(seconds, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "layers": [asdict(r) for r in layer_reports],
        "fallbacks": [f for r in layer_reports for f in r.fallbacks],
    }


def format_report(r: dict) -> str:
    lines = ["| component | original bytes | compressed bytes |", "|---|---:|---:|"]
    for comp, nb in r["bytes_original"].items():
        lines.append(f"| {comp} | {nb:,} | {r['bytes_compressed'][comp]:,} |")
    lines.append(f"| **total** | {r['total_original']:,} | {r['total_compressed']:,} |")
    ratio = r["total_original"] / max(r["total_compressed"], 1)
    lines += ["", f"expert formats: {r['formats']}", f"compression: {ratio:.2f}x; time {r['seconds']} s; "
              f"peak memory {r['peak_rss_mb']:.0f} MB (per layer: "
              f"{', '.join(str(round(l['peak_rss_mb'])) for l in r['layers'])} MB)"]
    fb = r["fallbacks"]
    lines.append(f"fallbacks: {len(fb)}" + "".join(f"\n  - {f}" for f in fb[:50]))
    return "\n".join(lines)


def format_inspect(info: dict) -> str:
    lines = [f"model: {info['model']}", f"architecture: {info['architecture']}",
             f"layers: {info['layers']} (MoE layers: {len(info['moe_layers'])})" if info["layers"] is not None
             else f"up-cycled MLP blocks: {len(info['moe_layers'])}",
             f"experts per layer: {info['experts_per_layer']}, top-k: {info['top_k']}, "
             f"shared experts: {'yes' if info['shared_experts'] else 'no'}", "bytes by component:"]
    lines += [f"  {comp:<15} {nb:>14,}" for comp, nb in info["bytes"].items()]
    lines.append(f"  {'total':<15} {sum(info['bytes'].values()):>14,}")
    if info["formats"]:
        lines.append("expert formats (layer x expert):")
        for name, formats in info["formats"].items():
            lines.append(f"  {name:<32} " + " ".join(f"{f:>7}" for f in formats))
    return "\n".join(lines)

