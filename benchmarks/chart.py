"""Draw kimi-mlx against a peer, one pair of bars a context length, as an SVG (no plotting library needed).

    python benchmarks/chart.py --contexts 1k,32k,128k --ours 318,326,238 --peer 86,89,76 --ratios 3.69,3.64,3.29 \
        --title "decode tok/s, NVIDIA H100, full 48B-A3B shape, 4-bit" --out docs/decode-by-context.svg

The figures are a recorded run's (benchmarks/RESULTS.md names the run each chart in the README was drawn from).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from xml.sax.saxutils import escape

W, H = 640, 300  # drawing size in px
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 40, 44  # margins: axis labels left, title top, context labels bottom
OURS, PEER = "#2b6cb0", "#a0aec0"


def _numbers(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",")]
    except ValueError:
        raise SystemExit(f"error: {text!r} is not a comma-separated list of numbers, e.g. 318,326,238") from None


def svg(contexts: list[str], ours: list[float], peer: list[float], title: str, peer_name: str = "mlx-lm",
        ratios: list[float] | None = None) -> str:
    """The chart's SVG text: per context a bar for ours and one for the peer, each labelled with its value, and
    under them the ratio (ratios: the run's own, e.g. medians of rounds, where the bars' figures are rounded)."""
    if not (len(contexts) == len(ours) == len(peer) == len(ratios or contexts)) or not contexts:
        raise SystemExit("error: --contexts, --ours, --peer (and --ratios) need the same number of entries")
    top = max(ours + peer) * 1.15
    plot_w, plot_h = W - LEFT - RIGHT, H - TOP - BOTTOM
    slot = plot_w / len(contexts)
    bar = slot * 0.32

    def y(v: float) -> float:
        return TOP + plot_h * (1 - v / top)

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
             f'font-family="sans-serif" font-size="12">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<text x="{W / 2}" y="20" text-anchor="middle" font-size="14">{escape(title)}</text>',
             f'<line x1="{LEFT}" y1="{TOP + plot_h}" x2="{W - RIGHT}" y2="{TOP + plot_h}" stroke="#333"/>']
    ratios = ratios or [a / b if b else 0.0 for a, b in zip(ours, peer)]
    for i, (ctx, a, b, r) in enumerate(zip(contexts, ours, peer, ratios)):
        x = LEFT + slot * i + slot / 2
        for dx, v, color in ((-bar, a, OURS), (0, b, PEER)):
            parts.append(f'<rect x="{x + dx:.1f}" y="{y(v):.1f}" width="{bar:.1f}" height="{TOP + plot_h - y(v):.1f}" '
                         f'fill="{color}"/>')
            parts.append(f'<text x="{x + dx + bar / 2:.1f}" y="{y(v) - 4:.1f}" text-anchor="middle">{v:g}</text>')
        ratio = f"{r:.1f}x" if r else ""
        parts.append(f'<text x="{x:.1f}" y="{TOP + plot_h + 18}" text-anchor="middle">{escape(ctx)}</text>')
        parts.append(f'<text x="{x:.1f}" y="{TOP + plot_h + 34}" text-anchor="middle" fill="{OURS}">{ratio}</text>')
    parts.append(f'<rect x="{LEFT}" y="{TOP - 12}" width="10" height="10" fill="{OURS}"/>'
                 f'<text x="{LEFT + 14}" y="{TOP - 3}">kimi-mlx</text>'
                 f'<rect x="{LEFT + 90}" y="{TOP - 12}" width="10" height="10" fill="{PEER}"/>'
                 f'<text x="{LEFT + 104}" y="{TOP - 3}">{escape(peer_name)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", required=True, help="labels, comma-separated, e.g. 1k,32k,128k")
    ap.add_argument("--ours", required=True, help="kimi-mlx's figures, comma-separated")
    ap.add_argument("--peer", required=True, help="the peer's figures, comma-separated")
    ap.add_argument("--peer-name", default="mlx-lm")
    ap.add_argument("--ratios", help="the run's own ratios, comma-separated (default: ours / peer of the figures)")
    ap.add_argument("--title", required=True)
    ap.add_argument("--out", required=True, help="the SVG file to write")
    a = ap.parse_args()
    text = svg(a.contexts.split(","), _numbers(a.ours), _numbers(a.peer), a.title, a.peer_name,
               _numbers(a.ratios) if a.ratios else None)
    out = Path(a.out)
    if not out.parent.is_dir():
        raise SystemExit(f"error: {out.parent} does not exist; create it or write the chart elsewhere")
    out.write_text(text)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
