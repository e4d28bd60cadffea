"""Prints tok/s and inter-token p50/p99 per engine and client count of the serve_{base,new}_N.json runs here."""
import glob, json, os
here = os.path.dirname(os.path.abspath(__file__))
for path in sorted(glob.glob(os.path.join(here, "serve_*_*.json")), key=lambda p: (p.split("_")[-1], p)):
    d = json.load(open(path))
    cells = []
    for r in d["models"][0]["rows"]:
        cells.append(f"{r['engine'][:6]}x{r['clients']} {r['tok_s']:.0f} ({r['itl_p50_ms']:.1f}/{r['itl_p99_ms']:.1f})")
    print(os.path.basename(path)[:-5], d["date"][11:], " | ".join(cells))
