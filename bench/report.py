"""The benchmark's tables: one row per runtime and dtype, ratios against transformers fp32."""

from __future__ import annotations


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def greedy_agreement(ours: dict, reference: dict) -> dict:
    """Free-running greedy rows against transformers': rows identical, and the mean share of each
    row before the first differing token."""
    pairs = [(ours["single"], reference["single"]), (ours["long"], reference["long"]), *zip(ours["batch"], reference["batch"])]
    shares = [common_prefix(a, b) / max(len(b), 1) for a, b in pairs]
    return {"rows": len(pairs), "identical_rows": sum(a == b for a, b in pairs), "mean_identical_prefix": sum(shares) / len(shares)}


def median(values: list[float]) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def early_late(r: dict) -> tuple[float | None, float | None]:
    """Median step of tokens 9-24 and of the last 16 tokens of the long run: medians of 16 steps,
    so a neighbour's burst on a shared host moves them less than 8-step means; the means where a
    runtime reports no steps (transformers)."""
    steps = r.get("long_steps_ms")
    if not steps:
        return r["long_early_ms"], r["long_late_ms"]
    # Step k gives token k + 2.
    return median(steps[7:23]), median(steps[-16:])


def _f(x: float | None, digits: int = 0, suffix: str = "") -> str:
    return "–" if x is None else f"{x:.{digits}f}{suffix}"


def tables(results: list[dict]) -> str:
    """`results[0]` is transformers; every entry holds the `paligemma bench` fields plus `memory`,
    `floor_ms` and, for ours, `greedy` and `teacher_forced`."""
    ref = results[0]
    ref_first = ref["vision_ms"] + ref["prefill_ms"]
    long_tokens = ref.get("long_tokens", 256)
    batch = ref.get("batch", 4)
    speed = [
        "| runtime | dtype | load s | vision ms | prefill ms | vision+prefill vs tf | first token ms | decode ms/token | decode vs tf "
        f"| decode floor ms | decode / floor | token 9-24 / last 16 of {long_tokens} ms | batch-{batch} tokens/s "
        f"| batch-{batch} / batch-1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    quality = [
        "| runtime | dtype | peak RSS GB | peak anonymous GB | graphs GB | greedy rows = tf | identical prefix "
        "| teacher-forced top-1 (positions, distinct reference tokens) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        first = r["vision_ms"] + r["prefill_ms"]
        early, late = early_late(r)
        speed.append(
            f"| {r['runtime']} | {r['dtype']} | {_f(r['load_s'], 1)} | {_f(r['vision_ms'])} | {_f(r['prefill_ms'])} "
            f"| {_f(ref_first / first, 2, 'x')} | {_f(r['first_token_ms'])} | {_f(r['decode_ms_per_token'], 1)} "
            f"| {_f(ref['decode_ms_per_token'] / r['decode_ms_per_token'], 2, 'x')} | {_f(r['floor_ms'], 1)} "
            f"| {_f(r['decode_ms_per_token'] / r['floor_ms'], 2, 'x')} | {_f(early, 1)} / {_f(late, 1)} "
            f"| {_f(r['batch_decode_tokens_per_s'], 1)} | {_f(r['batch_decode_tokens_per_s'] / r['single_decode_tokens_per_s'], 2, 'x')} |"
        )
        greedy, forced = r.get("greedy"), r.get("teacher_forced")
        rows = "reference" if greedy is None else "{identical_rows}/{rows}".format(**greedy)
        prefix = "–" if greedy is None else "{:.0%}".format(greedy["mean_identical_prefix"])
        top1 = (
            "–"
            if forced is None
            else "{:.1%} ({}, {} distinct)".format(forced["teacher_forced"], forced["positions"], forced["distinct_reference_tokens"])
        )
        memory = r["memory"]
        quality.append(
            f"| {r['runtime']} | {r['dtype']} | {_f(memory['peak_rss_gb'], 2)} | {_f(memory['peak_anon_gb'], 2)} "
            f"| {_f(r.get('graph_gb'), 2)} | {rows} | {prefix} | {top1} |"
        )
    # What a runtime warned about at load (a provider fallback, a format run another way on this CPU).
    warned = [f"- {r['runtime']} {r['dtype']}: {w}" for r in results for w in r.get("warnings", [])]
    notes = "\nWarnings at load:\n" + "\n".join(warned) + "\n" if warned else ""
    return "\n".join(speed) + "\n\n" + "\n".join(quality) + "\n" + notes
