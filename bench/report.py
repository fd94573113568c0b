"""The tables printed at the end of a run (also pasted into docs/performance.md).

``rows``: every (size, variant) against the ceiling and the peers. ``time_rows``: where the
pre-filled run's worker time went (computing, or not). ``crossover_rows`` and ``crossover``:
payloads inline and stored side by side, and from which size the stored path keeps up.
"""

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
    "prefilled CPU % workers/consumer/broker[/store]",
    "consumer÷worker CPU %",
)
#: How a run of the service with payloads stored is named beside its inline one.
STORED_SUFFIX = "/stored"


def variant_key(name: str, payloads: str) -> str:
    """``service`` (inline) and ``service/stored``: the keys of a size's variants."""
    return name if payloads == "inline" else f"{name}{STORED_SUFFIX}"


def _rate(value: float | None) -> str:
    if value is None:
        return "-"
    if value >= 100:
        return f"{value:,.0f}"
    if value >= 10:
        return f"{value:.1f}"
    if value >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"  # 2048 and up: a few per minute, 0.0344 not 0.03


def _ratio(part: dict[str, Any] | None, ceiling: float) -> str:
    if not part or "rate" not in part:
        if part and "skipped" in part:
            return "skipped"
        return "-" if not part or "error" not in part else "failed"
    return f"{_rate(part['rate'])} ({part['rate'] / ceiling:.2f})"


def _ms(value: float | None) -> str:
    return "-" if value is None else (f"{value:.1f}" if value < 100 else f"{value:.0f}")


def _cpu(prefilled: dict[str, Any] | None) -> str:
    cpu = (prefilled or {}).get("cpu")
    if not cpu:
        return "-"
    parts = ("workers", "consumer", "broker", *(("store",) if "store" in cpu else ()))
    return "/".join(f"{100 * cpu[k]:.0f}" for k in parts)


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
    return _markdown(HEADER, rows(report))


def text(report: dict[str, Any]) -> str:
    return _text(HEADER, rows(report))


# --- where the pre-filled time went ------------------------------------------------------------


def time_split(
    compute_ms: list[float], span_s: float, count: int, ceiling: float | None, cpus: int
) -> dict[str, float] | None:
    """The pre-filled ratio to the ceiling, taken apart: ratio = compute_busy / svd_slowdown.

    - ``compute_busy``: the share of the workers' time (cpus x the window) spent in the SVD
      (the answers' ``compute_ms``); the rest is reading and writing payloads, decoding, and
      waiting for work;
    - ``svd_slowdown``: one SVD's mean time in the workers over its time in the ceiling's
      processes (cpus / ceiling rate): the same work, slower for sharing the CPUs;
    - ``other_s``: worker time per request outside the SVD (cpus x window / answers - SVD).

    None without answers or a ceiling.
    """
    if not compute_ms or not ceiling or span_s <= 0 or count <= 0:
        return None
    svd_s = sum(compute_ms) / len(compute_ms) / 1000
    ceiling_svd_s = cpus / ceiling
    return {
        "compute_busy": sum(compute_ms) / 1000 / (span_s * cpus),
        "svd_slowdown": svd_s / ceiling_svd_s,
        "svd_s": svd_s,
        "ceiling_svd_s": ceiling_svd_s,
        "other_s": span_s * cpus / len(compute_ms) - svd_s,
    }


TIME_HEADER = (
    "size",
    "variant",
    "prefilled ratio",
    "workers computing %",
    "SVD s: workers / ceiling",
    "worker s per request outside the SVD",
    "store: read s (sha256) / write s (sha256)",
    "prefilled CPU % workers/consumer/broker[/store]",
)


def _seconds(value: float | None) -> str:
    if value is None:
        return "-"
    return (
        f"{value:.3f}"
        if abs(value) < 1
        else (f"{value:.2f}" if abs(value) < 10 else f"{value:.1f}")
    )


def _probe(probe: dict[str, Any] | None) -> str:
    if not probe or "read_s" not in probe:
        return "-"
    return (
        f"{_seconds(probe['read_s'])} ({_seconds(probe['read_sha256_s'])}) / "
        f"{_seconds(probe['write_s'])} ({_seconds(probe['write_sha256_s'])})"
    )


def time_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for label, size in report["sizes"].items():
        ceiling = size["ceiling"]["rate"]
        for name, variant in size.get("variants", {}).items():
            prefilled = variant.get("prefilled") or {}
            split = prefilled.get("time")
            if not split:
                continue
            stored = variant.get("payloads") == "stored"
            out.append(
                (
                    label,
                    name,
                    f"{prefilled['rate'] / ceiling:.2f}",
                    f"{100 * split['compute_busy']:.0f}",
                    f"{_seconds(split['svd_s'])} / {_seconds(split['ceiling_svd_s'])} "
                    f"({split['svd_slowdown']:.2f}x)",
                    _seconds(split["other_s"]),
                    _probe(size.get("store_probe")) if stored else "-",
                    _cpu(prefilled),
                )
            )
    return out


# --- inline against stored: the crossover -----------------------------------------------------

CROSSOVER_HEADER = (
    "size",
    "variant",
    "ceiling/s",
    "prefilled/s inline (ratio)",
    "prefilled/s stored (ratio)",
    "stored÷inline prefilled",
    "sdk/s inline (ratio)",
    "sdk/s stored (ratio)",
    "stored÷inline sdk",
    "added p50 ms inline / stored",
)


def _pairs(report: dict[str, Any]) -> list[tuple[str, str, dict[str, Any], dict[str, Any], float]]:
    """(size, variant, inline run, stored run, ceiling) wherever a size has both."""
    out = []
    for label, size in report["sizes"].items():
        variants = size.get("variants", {})
        for name, inline in variants.items():
            stored = variants.get(variant_key(name, "stored"))
            if inline.get("payloads", "inline") == "inline" and stored is not None:
                out.append((label, name, inline, stored, size["ceiling"]["rate"]))
    return out


def _versus(stored: dict[str, Any] | None, inline: dict[str, Any] | None) -> str:
    if not stored or not inline or "rate" not in stored or "rate" not in inline:
        return "-"
    return f"{stored['rate'] / inline['rate']:.2f}"


def crossover_rows(report: dict[str, Any]) -> list[tuple[str, ...]]:
    out: list[tuple[str, ...]] = []
    for label, name, inline, stored, ceiling in _pairs(report):
        added = [(run.get("latency") or {}).get("added_p50_ms") for run in (inline, stored)]
        out.append(
            (
                label,
                name,
                _rate(ceiling),
                _ratio(inline.get("prefilled"), ceiling),
                _ratio(stored.get("prefilled"), ceiling),
                _versus(stored.get("prefilled"), inline.get("prefilled")),
                _ratio(inline.get("sdk"), ceiling),
                _ratio(stored.get("sdk"), ceiling),
                _versus(stored.get("sdk"), inline.get("sdk")),
                f"{_ms(added[0])} / {_ms(added[1])}",
            )
        )
    return out


def crossover(report: dict[str, Any]) -> dict[str, dict[str, str | None]]:
    """Per variant and scenario (prefilled, sdk): the smallest size from which the stored path
    is at least as fast as inline at that size and every larger one measured; None where it
    never is (or is not measured)."""
    by_variant: dict[str, list[tuple[int, str, dict[str, Any], dict[str, Any]]]] = {}
    for label, name, inline, stored, _ in _pairs(report):
        rows, cols = report["sizes"][label]["shape"]
        by_variant.setdefault(name, []).append((rows * cols, label, inline, stored))
    out: dict[str, dict[str, str | None]] = {}
    for name, pairs in by_variant.items():
        pairs.sort(key=lambda pair: pair[0])
        out[name] = {}
        for scenario in ("prefilled", "sdk"):
            found: str | None = None
            for _, label, inline, stored in pairs:
                a, b = inline.get(scenario) or {}, stored.get(scenario) or {}
                keeps_up = "rate" in a and "rate" in b and b["rate"] >= a["rate"]
                found = (found or label) if keeps_up else None
            out[name][scenario] = found
    return out


def crossover_text(report: dict[str, Any]) -> str:
    lines = []
    for name, found in crossover(report).items():
        said = [
            f"{scenario}: from {label}" if label else f"{scenario}: at none of the sizes"
            for scenario, label in found.items()
        ]
        lines.append(f"stored at least as fast as inline ({name}): " + "; ".join(said))
    return "\n".join(lines)


def _markdown(header: tuple[str, ...], body: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def _text(header: tuple[str, ...], body: list[tuple[str, ...]]) -> str:
    table = [header, *body]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.rjust(w) if i > 1 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in table
    )


def notes(report: dict[str, Any]) -> list[str]:
    """What a run left out or found amiss, per size: a way of sending payloads not measured, a
    peer skipped, answers that were errors, objects the stored runs left in the store."""
    out: list[str] = []
    for label, size in report["sizes"].items():
        if note := size.get("payloads_note"):
            out.append(f"{label}: {note}")
        for peer in ("quickfix", "celery"):
            if skipped := (size.get(peer) or {}).get("skipped"):
                out.append(f"{label}: {peer} skipped: {skipped}")
        for name, variant in size.get("variants", {}).items():
            if errors := (variant.get("prefilled") or {}).get("errors"):
                out.append(f"{label} {name}: {errors} pre-filled answers were errors")
            if left := variant.get("store_objects_left"):
                out.append(f"{label} {name}: {left} objects were left in the store (deleted)")
    return out


def all_markdown(report: dict[str, Any]) -> str:
    """Every table of a report, as docs/performance.md shows them."""
    parts = [markdown(report)]
    if body := time_rows(report):
        parts.append(_markdown(TIME_HEADER, body))
    if body := crossover_rows(report):
        parts.append(_markdown(CROSSOVER_HEADER, body))
        parts.append(crossover_text(report))
    if said := notes(report):
        parts.append("\n".join(f"- {note}" for note in said))
    return "\n\n".join(parts)


def all_text(report: dict[str, Any]) -> str:
    """Every table of a report, for the terminal."""
    parts = [text(report)]
    if body := time_rows(report):
        parts.append("Where the pre-filled time went (ratio = computing % / SVD slowdown):")
        parts.append(_text(TIME_HEADER, body))
    if body := crossover_rows(report):
        parts.append("Payloads inline and stored, side by side:")
        parts.append(_text(CROSSOVER_HEADER, body))
        parts.append(crossover_text(report))
    if said := notes(report):
        parts.append("Notes:\n" + "\n".join(f"- {note}" for note in said))
    return "\n\n".join(parts)
