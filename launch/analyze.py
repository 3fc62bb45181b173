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

from msplora_dist.cli.analyze import main

if __name__ == "__main__":
    raise SystemExit(main())
