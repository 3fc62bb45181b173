"""The LoRA-vs-MSPLoRA quality study (docs/quality.md): prepare, make_task, pretrain, grid, bundle, report."""
