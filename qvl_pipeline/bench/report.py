"""The benchmark's report: each system's row next to the decode ceiling its own weight bytes allow, and the
accuracy of the level that ran (pure functions over the workers' results)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

GB = 1e9

# (key, header, format) of the speed table, in order.
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("load_s", "load s", ".2f"),
    ("vision_s", "vision s", ".2f"),
    ("prefill_s", "prefill s", ".2f"),
    ("ttft_s", "TTFT s", ".2f"),
    ("decode_tokens_per_s", "decode tok/s", ".2f"),
    ("peak_rss_gib", "peak RSS GiB", ".2f"),
    ("bytes_per_token_gb", "GB read/token", ".4g"),
    ("ceiling_tokens_per_s", "ceiling tok/s", ".2f"),
    ("fraction_of_ceiling", "of ceiling", ".0%"),
)


def with_ceiling(row: Mapping[str, Any], bandwidth_gb_s: float) -> dict[str, Any]:
    """A system's row with its decode ceiling: RAM bandwidth ÷ the weight bytes its decode step reads (in the
    format that ran), and the fraction of it the measured decode speed reached."""
    out = dict(row)
    per_token = row["weights_read_per_token"]["bytes"]
    ceiling = bandwidth_gb_s * GB / per_token if per_token and bandwidth_gb_s > 0 else None
    tps = row["decode_tokens_per_s"]
    out.update(bytes_per_token=per_token, bytes_per_token_gb=round(per_token / GB, 6),
               ceiling_tokens_per_s=round(ceiling, 3) if ceiling else None,
               fraction_of_ceiling=float(f"{tps / ceiling:.4g}") if ceiling and tps else None)
    return out


def _cell(value: Any, spec: str, width: int) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return f"{'-':>{width}}"
    return f"{format(value, spec):>{width}}"


def _format_bytes(by_dtype: Mapping[str, int]) -> str:
    return " + ".join(f"{dtype} {n / GB:.3g} GB" for dtype, n in sorted(by_dtype.items(), key=lambda kv: -kv[1]))


def render_speed(report: Mapping[str, Any]) -> list[str]:
    work = report["work"]
    lines = [f"{report['checkpoint']['source']}, {report['checkpoint']['parameters'] / 1e6:,.1f} M parameters "
             f"({report['checkpoint']['stored_dtype']}); "
             f"{work['image']} ({work['image_size']}) + {work['prompt']!r}; {work['tokens']} new tokens greedy; "
             f"median of {work['rounds']} round(s) after a warm-up",
             f"RAM read bandwidth (measured, the higher of before and after the runs): "
             f"{report['ram_bandwidth_gb_s']:g} GB/s; decode ceiling = bandwidth / "
             "weight bytes one decode step reads, in the format that ran"]
    names = list(report["systems"])
    width = max(14, *(len(n) for n in names)) + 2
    widths = [max(9, len(header) + 2) for _, header, _ in COLUMNS]
    lines.append(f"{'system':<{width}}" + "".join(f"{h:>{w}}" for (_, h, _), w in zip(COLUMNS, widths, strict=True)))
    notes = []
    for name, row in report["systems"].items():
        if "error" in row or "skipped" in row:
            lines.append(f"{name:<{width}}  {'failed: ' + row['error'] if 'error' in row else row['skipped']}")
            continue
        lines.append(f"{name:<{width}}" + "".join(_cell(row[key], spec, w)
                                                  for (key, _, spec), w in zip(COLUMNS, widths, strict=True)))
        weights = row["weights_read_per_token"]
        notes.append(f"  {name}: kernels {row['kernels']}: {_format_bytes(weights['by_dtype'])} per token; "
                     f"prompt {row['prompt_tokens']} tokens; RSS right after load {row['rss_after_load_gib']:.2f} GiB "
                     "(weights mapped but not yet read do not count)")
        short = [r for r in row["rounds"] if r["new_tokens"] < work["tokens"]]
        if short:
            notes.append(f"  {name}: !! stopped early in {len(short)} round(s) ({short[0]['new_tokens']} tokens, "
                         f"{short[0]['stop_reason']}): its decode speed covers fewer tokens")
    return lines + notes


def render_accuracy(accuracy: Mapping[str, Any], level: str) -> list[str]:
    width = max(len("model"), *(len(label) for label in accuracy)) + 2
    lines = [f"accuracy of opt={level} against the exact path (opt=minimal, every slot on its reference plugin):",
             f"  {'model':<{width}}{'greedy agreement':>18}{'max |logit err|':>17}{'rel. logit err':>16}"
             f"{'exact logit range':>19}"]
    for label, result in accuracy.items():
        if "same_as_exact" in result:
            lines.append(f"  {label:<{width}}  identical: {result['note']}")
            continue
        lines.append(f"  {label:<{width}}{result['agree']:>11} / {result['compared']:<4}"
                     f"{result['max_abs_logit_error']:>17.3g}{result['rel_logit_error']:>16.3g}"
                     f"{result['exact_logit_range']:>19.3g}")
    lines.append("  (greedy agreement: tokens equal before the first difference; logits: the first answer token's)")
    return lines


def render(report: Mapping[str, Any]) -> str:
    """The printed table: speed per system with its ceiling, then accuracy (when measured)."""
    lines = render_speed(report)
    if report["accuracy"]:
        lines += ["", *render_accuracy(report["accuracy"], report["opt_level"])]
    return "\n".join(lines)
