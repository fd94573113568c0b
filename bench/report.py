"""The table printed at the end of a run (also pasted into docs/performance.md)."""

from __future__ import annotations

from typing import Any

HEADER = (
    "size",
    "variant",
    "ceiling/s",
    "prefilled/s (ratio)",
    "sdk/s (ratio)",
    "quick-fix/s (ratio)",
    "celery/s (ratio)",
    "sdk÷celery",
    "p50/p99 ms",
    "added p50 ms",
    "added p50 ms at 1/20 load",
    "peak RSS (PSS) MiB",
    "prefilled CPU % workers/consumer/broker",
    "consumer÷worker CPU %",
)


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ratio(part: dict[str, Any] | None, ceiling: float) -> str:
    if not part or "rate" not in part:
        return "-" if not part or "error" not in part else "failed"
    return f"{_rate(part['rate'])} ({part['rate'] / ceiling:.2f})"


def _ms(value: float | None) -> str:
    return "-" if value is None else (f"{value:.1f}" if value < 100 else f"{value:.0f}")


def _cpu(prefilled: dict[str, Any] | None) -> str:
    cpu = (prefilled or {}).get("cpu")
    if not cpu:
        return "-"
    return "/".join(f"{100 * cpu[k]:.0f}" for k in ("workers", "consumer", "broker"))


def consumer_worker_pct(cpu: dict[str, Any] | None) -> float | None:
    """The consumer's own process's CPU time as a percentage of its workers' (issue #16's target).

    None without a CPU split, or when the workers got no measurable CPU (nothing to divide by).
    """
    if not cpu or cpu.get("workers", 0) <= 0:
        return None
    return 100 * float(cpu["consumer"]) / float(cpu["workers"])


def _consumer_worker(prefilled: dict[str, Any] | None) -> str:
    prefilled = prefilled or {}
    # Reports written before the figure was stored still have the split it comes from.
    pct = prefilled.get("consumer_worker_cpu_pct")
    if pct is None:
        pct = consumer_worker_pct(prefilled.get("cpu"))
    if pct is None:
        return "-"
    # The targets go down to a few percent, where a whole number would hide the difference.
    return f"{pct:.0f}" if pct >= 10 else f"{pct:.1f}"


def rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for label, size in report["sizes"].items():
        ceiling = size["ceiling"]["rate"]
        celery = size.get("celery") or {}
        for name, variant in size.get("variants", {}).items():
            sdk = variant.get("sdk") or {}
            latency = variant.get("latency") or {}
            memory = variant.get("memory") or {}
            versus = (
                f"{sdk['rate'] / celery['rate']:.1f}x"
                if "rate" in sdk and "rate" in celery
                else "-"
            )
            peak = (
                f"{memory['peak_rss_bytes'] >> 20} ({memory['peak_pss_bytes'] >> 20})"
                if memory
                else "-"
            )
            out.append(
                (
                    label,
                    name,
                    _rate(ceiling),
                    _ratio(variant.get("prefilled"), ceiling),
                    _ratio(sdk, ceiling),
                    _ratio(size.get("quickfix"), ceiling),
                    _ratio(celery, ceiling),
                    versus,
                    f"{_ms(latency.get('p50_ms'))}/{_ms(latency.get('p99_ms'))}",
                    _ms(latency.get("added_p50_ms")),
                    _ms((variant.get("latency_low") or {}).get("added_p50_ms")),
                    peak,
                    _cpu(variant.get("prefilled")),
                    _consumer_worker(variant.get("prefilled")),
                )
            )
    return out


def markdown(report: dict[str, Any]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in rows(report)]
    return "\n".join(lines)


def text(report: dict[str, Any]) -> str:
    table = [HEADER, *rows(report)]
    widths = [max(len(row[i]) for row in table) for i in range(len(HEADER))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i > 1 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in table
    )
