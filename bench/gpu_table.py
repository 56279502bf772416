"""bench/gpu.py's printed summary: one table per bench, median ms per provider."""
from __future__ import annotations

BENCHES = ("layer_fwd", "layer_jvp", "field", "solve", "e2e")


def table(records) -> str:
    rows = {}
    for r in records:
        c = r.config
        key = (r.bench, c.get("width"), c.get("batch"), c.get("density", c.get("sparsity")))
        rows.setdefault(key, {})[r.provider] = r.ms
    lines = []
    for bench in BENCHES:
        keys = [k for k in rows if k[0] == bench]
        if not keys:
            continue
        provs = sorted({p for k in keys for p in rows[k]})
        lines.append(f"\n## {bench} (median ms; lower is better)")
        lines.append(f"{'width':>6} {'batch':>7} {'dens/sp':>7} " + " ".join(f"{p:>16}" for p in provs))
        for k in sorted(keys, key=lambda k: (k[1], k[2], -(k[3] or 0))):
            lines.append(f"{k[1]:>6} {k[2]:>7} {k[3]:>7.2f} "
                         + " ".join(f"{rows[k].get(p, float('nan')):>16.4f}" for p in provs))
    return "\n".join(lines)
