"""The printed table: every row and anchor of one or more runs, each against every anchor present (the nearest in time:
the same run and round, else the same run, else any), the memory budget of a budget row, ZeRO-3 against ZeRO-2."""

from __future__ import annotations

from tools.trainer_speed.anchors import ANCHORS


def measured(r: dict) -> bool:
    return "tokens_per_s" in r


def nearest(results: list[dict], r: dict, name: str) -> dict | None:
    """The measured row `name` nearest in time to r: of r's session and round, else of its session, else the first."""
    candidates = [a for a in results if a["row"] == name and measured(a)]
    same_session = [a for a in candidates if a.get("session") == r.get("session")]
    same_round = [a for a in same_session if a.get("round") == r.get("round")]
    return next(iter(same_round or same_session or candidates), None)


def budget_cell(r: dict) -> str:
    if "budget_gb" not in r:
        return ""
    return f"{r['budget_gb']:g} GB: {'within' if r['peak_gb'] <= r['budget_gb'] else 'OVER'}"


def table_lines(results: list[dict]) -> list[str]:
    anchors = [a for a in ANCHORS if any(r["row"] == a and measured(r) for r in results)]  # Unsloth first
    head = f"{'row':<22}{'tokens/s':>10}{'peak GB':>9}{'trainable':>12}{'loss@1':>9}"
    head += "".join(f"{'x ' + a:>{max(10, len(a) + 4)}}" for a in anchors) + "  budget"
    lines = [head]
    for r in results:
        if not measured(r):
            lines.append(f"{r['row']:<22} " + (f"skipped: {r['skipped']}" if "skipped" in r else f"failed: {r['error']}"))
            continue
        line = f"{r['row']:<22}{r['tokens_per_s']:>10,.0f}{r['peak_gb']:>9.2f}{r['trainable']:>12,}{r['losses'][0]:>9.4f}"
        for a in anchors:
            ref = nearest(results, r, a)
            line += f"{r['tokens_per_s'] / ref['tokens_per_s']:>{max(10, len(a) + 4)}.3f}"
        lines.append(line + "  " + budget_cell(r))
    for r in results:  # ZeRO-3 against the same row on ZeRO-2
        twin = r["row"].replace("zero3", "zero2", 1).removesuffix("-keep")  # a -keep row (stage 3 on one GPU) too
        if r["row"].startswith("zero3") and measured(r) and (ref := nearest(results, r, twin)):
            lines.append(f"{r['row']} / {twin}: {r['tokens_per_s'] / ref['tokens_per_s']:.3f}")
    for session in dict.fromkeys(r.get("session") for r in results):  # one run's rows all train the same batches
        counts = {tuple(r["tokens_per_step"]) for r in results if measured(r) and r.get("session") == session}
        if len(counts) > 1:
            lines.append(f"warning: run {session}'s rows trained different token counts per step: {sorted(counts)}")
    for session in dict.fromkeys(r.get("session") for r in results):  # step 1: adapters zero, the base's loss
        first = sorted(r["losses"][0] for r in results if measured(r) and r.get("session") == session and r.get("losses"))
        if first and (first[-1] - first[0]) > 1e-3 * abs(first[len(first) // 2]):
            lines.append(f"warning: run {session}'s step-1 losses differ ({first[0]:.4f} to {first[-1]:.4f}): not the same "
                         "tokens, or not the same model (loss@1 should agree to bf16 rounding)")
    return lines
