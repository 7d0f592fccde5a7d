"""Regenerate the README's picture of the HTML report from a real report.

    python docs/render_report.py [--out docs/report.png] [--html FILE] [--width 1280]

Compiles the demo model (``attnfuse.demo.TinyGPT``, 2 blocks, 128 tokens) with
``backend="attnfuse"`` as ``attnfuse report`` does, writes the model's HTML report
(:func:`attnfuse.model_report.to_html`) and screenshots it with headless Chromium at
``--width`` pixels (the ``chromium`` Debian package; the script says so and exits 1 when
it is missing). The subgraph pictures are graphviz SVG where ``dot`` is installed, plain
boxes otherwise: the page reads the same either way (``--no-graphviz`` forces the boxes).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def build_report(html_path: str) -> str:
    import torch

    from attnfuse import model_report
    from attnfuse.backend import collect_reports
    from attnfuse.demo import TinyGPT

    torch.manual_seed(0)
    model = TinyGPT(n_layer=2, n_embd=64, n_head=4, block_size=128).eval()
    x = torch.randint(0, 512, (1, 128))
    compiled = torch.compile(model, backend="attnfuse",
                             options={"inner": "eager", "impl": "torch", "warn_unfused": False})
    with collect_reports() as reports, torch.no_grad():
        compiled(x)
    return model_report.to_html(reports, "attnfuse/demo.py:TinyGPT", "eval", html_path)


def screenshot(html_path: str, png_path: str, width: int, height: int) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        sys.exit("render_report: no chromium on PATH (Debian: apt-get install chromium); the HTML is at "
                 + html_path)
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--user-data-dir={profile}", f"--window-size={width},{height}",
                        f"--screenshot={os.path.abspath(png_path)}", "file://" + os.path.abspath(html_path)],
                       check=True, capture_output=True, timeout=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(HERE, "report.png"))
    ap.add_argument("--html", default=os.path.join(tempfile.gettempdir(), "attnfuse_demo_report.html"))
    ap.add_argument("--width", type=int, default=1280)
    ap.add_argument("--height", type=int, default=1400)
    ap.add_argument("--no-graphviz", action="store_true", help="draw subgraphs as plain boxes even with dot")
    args = ap.parse_args()
    if args.no_graphviz:
        os.environ["PATH"] = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                                             if not os.path.exists(os.path.join(p, "dot")))
    build_report(args.html)
    screenshot(args.html, args.out, args.width, args.height)
    print(f"wrote {args.html} and {args.out}")


if __name__ == "__main__":
    main()
