"""What each scale of an MSPLoRA adapter learned: spectra, effective ranks, decoupling of the levels,
cross-layer similarity, optionally against a plain LoRA or another MSPLoRA adapter.

    from msplora_dist.analysis import analyze_adapter, write_report, tensorboard_scalars

    report = analyze_adapter("runs/x/adapter", compare="runs/lora/adapter")   # a JSON-ready dict
    write_report(report, "runs/x/analysis")      # report.json, PNG plots, index.html (atomically)
    for tag, value in tensorboard_scalars(report).items():
        writer.add_scalar(tag, value, step)

Command line: python launch/analyze.py --adapter DIR --out DIR [--compare DIR]. Fields: docs/analysis.md.
"""

from msplora_dist.analysis.linalg import (
    RANK_RTOL,
    LowRankSVD,
    effective_rank,
    energy_topk,
    gram_of_updates,
    subspace_overlap,
    thin_svd,
    update_inner,
)
from msplora_dist.analysis.render import INDEX_NAME, REPORT_NAME, write_report
from msplora_dist.analysis.report import (
    analyze_adapter,
    analyze_factors,
    analyze_model,
    report_entries,
    tensorboard_scalars,
)
from msplora_dist.analysis.sources import AdapterFactors, Pair, load_factors

__all__ = [
    "INDEX_NAME",
    "RANK_RTOL",
    "REPORT_NAME",
    "AdapterFactors",
    "LowRankSVD",
    "Pair",
    "analyze_adapter",
    "analyze_factors",
    "analyze_model",
    "effective_rank",
    "energy_topk",
    "gram_of_updates",
    "load_factors",
    "report_entries",
    "subspace_overlap",
    "tensorboard_scalars",
    "thin_svd",
    "update_inner",
    "write_report",
]
