"""What each scale of an MSPLoRA adapter learned, as a report a person can look at.

Run from the repository root (CPU is enough; a 7B adapter takes seconds, about a minute with --compare)::

    python launch/analyze.py --adapter runs/msplora/adapter --out runs/msplora/analysis
    python launch/analyze.py --adapter runs/msplora/adapter --out runs/msplora/analysis \\
        --compare runs/lora_r64/adapter           # a PEFT LoRA directory, or another MSPLoRA adapter
    xdg-open runs/msplora/analysis/index.html

--out receives report.json (every number; fields in docs/analysis.md), spectra.png, level_share.png,
overlap.png, cross_layer.png (plus compare_*.png with --compare) and index.html, which shows them with a
table of effective ranks and a note on how to read each plot. The directory is written atomically and
replaced as a whole; an existing --out must be empty or an earlier report.

--adapter may also be a PEFT LoRA directory (adapter_config.json + adapter_model.safetensors): its
report then has the per-layer entries (delta.{l}.{t}) and the cross-layer similarity only.

Exit status: 0 on success, 2 on bad input (a missing directory, not an adapter, a corrupt file, an --out
that cannot be replaced), with a one-line "error: ..." on stderr.
"""

from __future__ import annotations

import argparse
import sys

from msplora_dist.analysis import analyze_adapter, tensorboard_scalars, write_report
from msplora_dist.errors import UserError


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="See docs/analysis.md.")
    parser.add_argument("--adapter", required=True, help="MSPLoRA adapter directory (save_adapter), or a PEFT LoRA directory")
    parser.add_argument("--out", required=True, help="output directory (report.json, *.png, index.html); replaced as a whole")
    parser.add_argument("--compare", default=None, help="a PEFT LoRA adapter directory or another MSPLoRA adapter")
    parser.add_argument("--no-plots", action="store_true", help="write report.json and index.html only")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        report = analyze_adapter(args.adapter, compare=args.compare)
        out = write_report(report, args.out, plots=not args.no_plots)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"analysed {args.adapter} ({report['adapter']['kind']}, {report['adapter']['num_layers']} layers)")
    for t, s in report["summary"].items():
        erank = ", ".join(f"{lv} {v:.1f}/{s['rank'][lv]}" for lv, v in s["effective_rank"].items() if v is not None)
        print(f"  {t:<10} effective rank {erank}")
        sbs = report.get("compare", {}).get("side_by_side", {}).get(t)
        if sbs and sbs["effective_rank_delta"]["other"] is not None:
            cos = sbs["mean_delta_cosine"]
            print(f"  {'':<10} --compare: delta {sbs['effective_rank_delta']['other']:.1f}/{sbs['rank_delta']['other']}"
                  + (f", cosine to this adapter's delta {cos:.2f} (mean over layers)" if cos is not None else ""))
    scalars = tensorboard_scalars(report)
    print(f"wrote {out / 'index.html'} ({len(scalars)} scalars for TensorBoard via tensorboard_scalars)")
    return 0


def run() -> None:
    """The console entry point (msplora-analyze)."""
    sys.exit(main())


if __name__ == "__main__":
    run()
