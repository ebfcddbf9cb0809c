"""Turns one benchmark run into benchmarks.json, benchmarks.md and benchmarks.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# A failed call brings no DATA at all; a successful one's size can differ from
# the probe's by a byte or two (timestamps are varints), hence the tolerance.
OK_SHARE = 0.97


def _ok(row: dict[str, Any]) -> str:
    if "grpc_ok" not in row:
        return "-"  # measured by the grpc.aio client, which fails loudly
    share = row["grpc_ok"]
    return f"{share:.1%}" if share >= OK_SHARE else f"**{share:.1%}**"


def _direct_ceiling(r: dict[str, Any]) -> dict[str, Any] | None:
    """Per operation, the higher of the direct client's runs before and after
    TaskService's (the stricter ceiling)."""
    runs = [r[k] for k in ("firestore_direct_before", "firestore_direct") if k in r]
    if not runs:
        return None
    return {op: max((run[op] for run in runs), key=lambda x: x["calls_per_s"]) for op in runs[0]}


def _combined(direct: float, echo: float) -> float:
    """The ceiling of a call that costs the machine both a direct-client call
    and an echo call: the emulator, its client and the gRPC server all share
    the same cores."""
    return 1 / (1 / direct + 1 / echo)


# Issue 20's targets for the SQLite store against the echo (16 in flight,
# the server's defaults: INFO access lines, telemetry off).
GET_CPU_VS_ECHO = 1.2
CREATE_SHARE_OF_ECHO = 0.60
# BatchCreateTasks of 10 against a single CreateTask, p50 at 1 in flight.
BATCH_10_VS_CREATE = 5.0
# Telemetry on (default sampling) against off: server CPU per GetTask.
TELEMETRY_CPU_VS_OFF = 1.15


def _targets(
    r: dict[str, Any], telemetry: dict[str, Any] | None = None
) -> list[tuple[str, str, bool]]:
    """(target, measured, met) for each target that this run (and, for
    telemetry, `python -m bench.telemetry`) measured."""
    out: list[tuple[str, str, bool]] = []
    echo = r["echo"]
    stores = r.get("stores", {})
    inter = r.get("sqlite_vs_echo")
    cpu_target = (
        f"server CPU per GetTask on SQLite at 16 in flight ≤ {GET_CPU_VS_ECHO}x the echo's"
        " (INFO access lines, telemetry off)"
    )
    create_target = (
        f"CreateTask on SQLite at 16 in flight ≥ {CREATE_SHARE_OF_ECHO:.0%} of echo calls/s"
    )
    if inter:
        ok = min(x.get("grpc_ok", 1.0) for x in inter["rounds"])
        failed = "" if ok >= OK_SHARE else f", but only {ok:.0%} of calls succeeded"
        each = ", ".join(f"{x['get_cpu_us'] / x['echo_cpu_us']:.2f}x" for x in inter["rounds"])
        out.append(
            (
                cpu_target,
                f"{inter['cpu_ratio']:.2f}x (median of interleaved rounds: {each})",
                inter["cpu_ratio"] <= GET_CPU_VS_ECHO,
            )
        )
        each = ", ".join(f"{x['create_ratio']:.0%}" for x in inter["rounds"])
        out.append(
            (
                create_target,
                f"{inter['create_ratio']:.0%} (median of interleaved rounds: {each}){failed}",
                inter["create_ratio"] >= CREATE_SHARE_OF_ECHO and ok >= OK_SHARE,
            )
        )
    elif "sqlite" in stores:
        s = stores["sqlite"]["rpcs"]
        cpu = s["GetTask"][16]["server_cpu_us_per_call"] / echo[16]["server_cpu_us_per_call"]
        out.append(
            (
                cpu_target,
                f"{cpu:.2f}x ({s['GetTask'][16]['server_cpu_us_per_call']:.0f} vs "
                f"{echo[16]['server_cpu_us_per_call']:.0f} µs)",
                cpu <= GET_CPU_VS_ECHO,
            )
        )
        ratio = s["CreateTask"][16]["calls_per_s"] / echo[16]["calls_per_s"]
        out.append(
            (
                create_target,
                f"{ratio:.0%} ({s['CreateTask'][16]['calls_per_s']:.0f}"
                f" vs {echo[16]['calls_per_s']:.0f})",
                ratio >= CREATE_SHARE_OF_ECHO,
            )
        )
    for store, s in stores.items():
        small = s.get("batch_10_vs_create")
        if small:
            out.append(
                (
                    f"BatchCreateTasks of 10 on {store}, one at a time: p50 ≤"
                    f" {BATCH_10_VS_CREATE:.0f}x a single CreateTask's p50",
                    f"{small['p50_ratio']:.1f}x ({small['batch_p50_ms']:.2f} vs"
                    f" {small['create_p50_ms']:.2f} ms; {small['pairs']} of each, alternating)",
                    small["p50_ratio"] <= BATCH_10_VS_CREATE,
                )
            )
    if telemetry:
        on, off = telemetry["modes"]["on"], telemetry["modes"]["off"]
        out.append(
            (
                "telemetry on (OTLP, default sampling): server CPU per GetTask on SQLite"
                f" ≤ {TELEMETRY_CPU_VS_OFF}x off",
                f"{on['cpu_vs_off']:.2f}x ({on['server_cpu_us_per_call']:.0f} vs"
                f" {off['server_cpu_us_per_call']:.0f} µs; `python -m bench.telemetry`,"
                f" {telemetry['date']})",
                on["cpu_vs_off"] <= TELEMETRY_CPU_VS_OFF,
            )
        )
    costs = r.get("firestore_costs", {})
    want = {
        "CreateTask": 1,
        "GetTask": 1,
        "DeleteTask": 1,
        "UpdateTask": 2,
        "ListTasks (page of 20)": 1,
        "BatchCreateTasks (500)": 1,
    }
    for name, rpcs in want.items():
        if name in costs:
            got = costs[name]
            out.append(
                (
                    f"Firestore RPCs per {name} = {rpcs}",
                    f"{got['rpcs']} ({got['by_method']}), documents read {got['documents_read']},"
                    f" written {got.get('documents_written', '?')}",
                    got["rpcs"] == rpcs and (name != "CreateTask" or got["documents_read"] == 0),
                )
            )
    direct = _direct_ceiling(r)
    if direct and "firestore" in stores:
        f = stores["firestore"]["rpcs"]
        for method, op in (("GetTask", "get"), ("CreateTask", "set")):
            row = f[method][64]
            ratio = row["calls_per_s"] / direct[op]["calls_per_s"]
            ok = row.get("grpc_ok", 1.0)
            out.append(
                (
                    f"{method} on the emulator at 64 in flight ≥ 70% of the direct client's {op}",
                    f"{ratio:.0%} ({row['calls_per_s']:.0f} vs {direct[op]['calls_per_s']:.0f})"
                    + ("" if ok >= OK_SHARE else f", but only {ok:.0%} of calls succeeded"),
                    ratio >= 0.70 and ok >= OK_SHARE,
                )
            )
        budget = 1.25 * (direct["get"]["client_cpu_us_per_op"] + echo[64]["server_cpu_us_per_call"])
        used = f["GetTask"][64]["server_cpu_us_per_call"]
        out.append(
            (
                "server CPU per GetTask on Firestore ≤ 1.25 x (direct get + echo)",
                f"{used:.0f} µs vs budget {budget:.0f} µs",
                used <= budget,
            )
        )
        rate = stores["firestore"]["batch_500_tasks_per_s"]
        out.append(
            (
                "BatchCreateTasks(500) on the emulator ≥ 2,000 tasks/s",
                f"{rate:.0f} tasks/s",
                rate >= 2000,
            )
        )
    cold = r.get("cold_start", {})
    for store, limit in (("sqlite", 1.0), ("firestore", 1.5)):
        if store in cold:
            out.append(
                (
                    f"cold start to SERVING on {store} ≤ {limit} s (median of 5)",
                    f"{cold[store]['median_s']} s",
                    cold[store]["median_s"] <= limit,
                )
            )
    for store, s in stores.items():
        out.append(
            (
                f"RSS after the full run ≤ 120 MB ({store})",
                f"{s['rss_mb_after_run']} MB",
                s["rss_mb_after_run"] <= 120,
            )
        )
        growth = s["rss_mb_after_repeat"] - s["rss_mb_after_run"]
        out.append(
            (f"no RSS growth over a repeated pass ({store})", f"{growth:+.1f} MB", growth <= 2.0)
        )
    return out


def _chart(r: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    methods = ["GetTask", "CreateTask", "UpdateTask", "ListTasks", "DeleteTask"]
    fig, axes = plt.subplots(1, max(1, len(r.get("stores", {}))), figsize=(12, 4.5), squeeze=False)
    for ax, (store, s) in zip(axes[0], r.get("stores", {}).items(), strict=False):
        width = 0.27
        for k, inflight in enumerate((1, 16, 64)):
            values = [s["rpcs"][m][inflight]["calls_per_s"] for m in methods]
            ax.bar(
                [i + (k - 1) * width for i in range(len(methods))],
                values,
                width,
                label=f"{inflight} in flight",
            )
        ax.axhline(
            r["echo"][64]["calls_per_s"],
            color="black",
            linestyle="--",
            label="echo ceiling (64 in flight)",
        )
        ax.set_xticks(range(len(methods)), methods, rotation=20)
        ax.set_title(f"TaskService on {store}: calls/s")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(r: dict[str, Any], out: Path) -> list[Path]:
    """Writes benchmarks.json, benchmarks.md and (with matplotlib)
    benchmarks.png into out; returns the files it wrote."""
    (out / "benchmarks.json").write_text(json.dumps(r, indent=2, default=str) + "\n")
    charted = _chart(r, out / "benchmarks.png")
    telemetry_path = out / "telemetry.json"
    telemetry = json.loads(telemetry_path.read_text()) if telemetry_path.exists() else None
    v = r["versions"]
    lines = [
        "# Benchmarks",
        "",
        f"`python -m bench{' --quick' if r['quick'] else ''}` on {r['date']}: {v['machine']},"
        f" {v['cpus']} CPUs, Python {v['python']}, grpcio {v['grpcio']}, protobuf {v['protobuf']},"
        f" google-cloud-firestore {v['google-cloud-firestore']}, h2load {v['h2load']}."
        " Everything on loopback in one run (the load generator shares the 2 cores);"
        " Firestore is the official emulator. Raw figures: `benchmarks.json`.",
        "",
        "## Targets",
        "",
        "| target | measured | met |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {t} | {m} | {'yes' if ok else '**no**'} |" for t, m, ok in _targets(r, telemetry)]
    lines += [
        "",
        "- GetTask's CPU and CreateTask's calls/s are the median of rounds that alternate"
        " the echo and TaskService on SQLite (the table near the end): the machine's speed"
        " drifts, so only neighbours compare. CPU per call is the server process's own.",
        "- BatchCreateTasks of 10: a grpc.aio client sends a stream of 10 CreateTaskRequests,"
        " one stream at a time, alternating with single CreateTasks of the same shape on the"
        " same channel; the target compares the two p50s. The server waits after a stream's"
        " END_STREAM only for clients on Node's http2 (grpc-js, connect-es), so this Python"
        " client pays no such wait.",
        "- Telemetry: from `python -m bench.telemetry` (its own section below), shown when its"
        " telemetry.json sits beside this report.",
        "- Firestore rows compare with the direct client (google-cloud-firestore's AsyncClient"
        " on the emulator, no TaskService); the emulator section also holds the combined"
        " ceiling of the direct client and the echo on this one machine.",
    ]
    lines += [
        "",
        "## Calls (BatchCreateTasks: streams of 500)",
        "",
        "gRPC OK: the share of calls that got a response body (h2load counts a failed"
        " gRPC call as HTTP 200; the harness estimates successes from the DATA bytes"
        " received, within 3%: sizes vary by a byte or two). A bold share means calls"
        " failed, and that row's calls/s counts them.",
        "",
        "ListTasks, GetTask and CreateTask come from h2load (one request body for every call);"
        " the other rows from a grpc.aio client in the benchmark's process, which spends more"
        " of the shared cores per call than h2load does: read those rows against each other,"
        " and against CreateTask (grpc.aio client), the same client's CreateTask. UpdateTask:"
        " each call updates its own task of 1,000 in turn (no two calls in flight share"
        " one), the usual case. UpdateTask (one hot task): every call updates the same task,"
        " so the calls in flight race for it (on Firestore a read-modify-write that loses"
        " reads again after a random pause, and a call that keeps losing fails ABORTED,"
        " counted in gRPC OK); at 1 in flight no one races, so it is not measured there.",
        "",
        "| server | RPC | in flight | calls/s | p50 ms | p99 ms | server CPU µs/call | RSS MB"
        " | gRPC OK |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for inflight, row in r["echo"].items():
        lines.append(
            f"| echo (ceiling) | GetTask | {inflight} | {row['calls_per_s']} | {row['p50_ms']} |"
            f" {row['p99_ms']} | {row['server_cpu_us_per_call']} | {row['rss_mb']} |"
            f" {_ok(row)} |"
        )
    for store, s in r.get("stores", {}).items():
        for method, rows in s["rpcs"].items():
            for inflight, row in rows.items():
                rate = row["calls_per_s"]
                if "tasks_per_s" in row:  # a stream of 500 tasks is one call
                    rate = f"{rate} ({row['tasks_per_s']:.0f} tasks/s)"
                lines.append(
                    f"| {store} | {method} | {inflight} | {rate} |"
                    f" {row['p50_ms']} | {row['p99_ms']} | {row['server_cpu_us_per_call']} |"
                    f" {row['rss_mb']} | {_ok(row)} |"
                )
    lines += [
        "",
        "## Streams, stalls, memory",
        "",
        "| store | figure | value |",
        "| --- | --- | --- |",
    ]
    for store, s in r.get("stores", {}).items():
        lines += [
            f"| {store} | BatchCreateTasks of 500, end to end |"
            f" {s['batch_500_tasks_per_s']} tasks/s |",
            f"| {store} | GetTask p99 at 16 in flight, quiet | {s['get_p99_ms_quiet']} ms |",
            f"| {store} | GetTask p99 at 16 in flight while 500-task batches commit |"
            f" {s['get_p99_ms_during_batches']} ms |",
            f"| {store} | RSS after the run / after a repeated pass |"
            f" {s['rss_mb_after_run']} / {s['rss_mb_after_repeat']} MB |",
        ]
    if "firestore_direct" in r:
        lines += [
            "",
            "## Firestore emulator, direct client (the backend's ceiling, 64 in flight)",
            "",
            "Measured right before and right after TaskService's run on the emulator,"
            " both after the warm-up; the targets use the higher of the two.",
            "",
            "| operation | when | calls/s | p50 ms | p99 ms | client CPU µs/op |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for when, key in (("before", "firestore_direct_before"), ("after", "firestore_direct")):
            for op, row in r.get(key, {}).items():
                lines.append(
                    f"| {op} | {when} | {row['calls_per_s']:.0f} | {row['p50_ms']:.2f} |"
                    f" {row['p99_ms']:.2f} | {row['client_cpu_us_per_op']:.0f} |"
                )
        lines += _combined_section(r)
    lines += _list_ceiling_section(r)
    if "sqlite_vs_echo" in r:
        lines += [
            "",
            "## SQLite against the echo ceiling, interleaved (16 in flight)",
            "",
            "| round | echo calls/s | GetTask calls/s | CreateTask calls/s | GetTask/echo"
            " | CreateTask/echo | CPU µs/call echo / GetTask |",
            "| --- | --- | --- | --- | --- | --- | --- |",
        ]
        for i, x in enumerate(r["sqlite_vs_echo"]["rounds"], 1):
            lines.append(
                f"| {i} | {x['echo_per_s']:.0f} | {x['get_per_s']:.0f} | {x['create_per_s']:.0f}"
                f" | {x['get_ratio']:.0%} | {x['create_ratio']:.0%}"
                f" | {x['echo_cpu_us']:.0f} / {x['get_cpu_us']:.0f} |"
            )
    if "emulator_warm_up" in r:
        lines += [
            "",
            "## Emulator warm-up (TaskService at 64 in flight, 3,000 calls a round)",
            "",
            "| round | GetTask calls/s | CreateTask calls/s | seconds |",
            "| --- | --- | --- | --- |",
        ]
        for i, row in enumerate(r["emulator_warm_up"], 1):
            lines.append(
                f"| {i} | {row['get_per_s']:.0f} | {row['create_per_s']:.0f} | {row['seconds']} |"
            )
    if "firestore_costs" in r:
        lines += [
            "",
            "## Firestore cost per TaskService call",
            "",
            "| call | Firestore RPCs | by method | billed documents read"
            " | billed documents written |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, c in r["firestore_costs"].items():
            lines.append(
                f"| {name} | {c['rpcs']} | {c['by_method']} | {c['documents_read']}"
                f" | {c.get('documents_written', '?')} |"
            )
    lines += _workers_section(out / "workers.json")
    lines += _watch_section(out / "watch.json")
    lines += _telemetry_section(out / "telemetry.json")
    lines += _stages_section(out / "stages.json")
    lines += ["", "## Cold start", "", "| what | median s | runs |", "| --- | --- | --- |"]
    for name, c in r.get("cold_start", {}).items():
        lines.append(f"| {name} | {c['median_s']} | {c.get('runs_s', '')} |")
    if charted:
        lines += ["", "![calls/s by RPC and concurrency vs. the echo ceiling](benchmarks.png)", ""]
    (out / "benchmarks.md").write_text("\n".join(lines) + "\n")
    written = [out / "benchmarks.md", out / "benchmarks.json"]
    return [*written, out / "benchmarks.png"] if charted else written


def _combined_section(r: dict[str, Any]) -> list[str]:
    """TaskService on the emulator against the direct client and against the
    combined ceiling of the direct client and the echo, 64 in flight."""
    direct = _direct_ceiling(r)
    firestore = r.get("stores", {}).get("firestore")
    if not direct or not firestore or 64 not in r["echo"]:
        return []
    echo = r["echo"][64]["calls_per_s"]
    lines = [
        "",
        "### TaskService against the combined ceiling (64 in flight)",
        "",
        "The emulator, its client, TaskService and h2load all share this machine's 2 cores,"
        " and a TaskService call on the emulator does the work of both a direct-client call"
        " and an echo call, so 1/(1/direct + 1/echo) calls/s, both at 64 in flight, is the"
        " combined ceiling on one shared machine (the echo's GetTask stands for the gRPC"
        " server's share of any unary call). The direct column is the higher of the runs"
        " above. It is an estimate, not a bound (the runs are minutes apart on a machine"
        " whose speed drifts, and not all of a call's time is CPU), so a ratio near or above"
        ' 100% reads as "at this machine\'s ceiling".',
        "",
        "| RPC | TaskService calls/s | direct client | calls/s | echo calls/s"
        " | combined ceiling | TaskService / combined | TaskService / direct |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for method, op in (("GetTask", "get"), ("CreateTask", "set")):
        if op not in direct or method not in firestore["rpcs"]:
            continue
        rate = firestore["rpcs"][method][64]["calls_per_s"]
        d = direct[op]["calls_per_s"]
        combined = _combined(d, echo)
        lines.append(
            f"| {method} | {rate:,.0f} | {op} | {d:,.0f} | {echo:,.0f} | {combined:,.0f} |"
            f" {rate / combined:.0%} | {rate / d:.0%} |"
        )
    return lines


def _list_ceiling_section(r: dict[str, Any]) -> list[str]:
    """ListTasks on the emulator beside the direct client's same query."""
    firestore = r.get("stores", {}).get("firestore", {})
    ceiling = firestore.get("list_ceiling")
    if not ceiling:
        return []
    lines = [
        "",
        "## ListTasks on the emulator against the same query, direct",
        "",
        "Both run on TaskService's collection of the 10,000 seeded tasks and send the query"
        " TaskService sends for a first page of 20: no filter, newest create_time first"
        " (then the document name), limit 21 (the page and one look-ahead document). At each"
        " number in flight the direct client (a process of its own) makes the same number of"
        " calls right beside TaskService's h2load run (before it at 1 and 64 in flight, after"
        " it at 16), after a warm-up of both. Combined ceiling: 1/(1/direct + 1/echo), the"
        " echo at the same number in flight.",
        "",
        "| in flight | calls | direct calls/s | direct p50 ms | ListTasks calls/s"
        " | ListTasks p50 ms | ListTasks gRPC OK | ListTasks / direct | combined ceiling"
        " | ListTasks / combined |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for inflight, d in ceiling.items():
        row = firestore["rpcs"]["ListTasks"][inflight]
        echo = r["echo"].get(inflight)
        combined = _combined(d["calls_per_s"], echo["calls_per_s"]) if echo else None
        lines.append(
            f"| {inflight} | {d['calls']} | {d['calls_per_s']:.1f} | {d['p50_ms']:.1f} |"
            f" {row['calls_per_s']:.1f} | {row['p50_ms']:.1f} | {_ok(row)} |"
            f" {row['calls_per_s'] / d['calls_per_s']:.0%} |"
            + (
                f" {combined:.1f} | {row['calls_per_s'] / combined:.0%} |"
                if combined
                else " - | - |"
            )
        )
    return lines


def _workers_section(path: Path) -> list[str]:
    """TASKSERVICE_WORKERS=1 against 2 (`python -m bench.workers`), if run."""
    if not path.exists():
        return []
    w = json.loads(path.read_text())
    lines = [
        "",
        f"## One worker against two (`python -m bench.workers`, {w['date']})",
        "",
        f"{w['inflight']} calls in flight over {w['connections']} connections (SO_REUSEPORT"
        " spreads connections over the workers); each row is the median of rounds that"
        " alternate 1 and 2 workers. CPU counts every process of the instance. The load"
        " generator, and for Firestore the emulator, run on the same 2 cores: two workers"
        " compete with them for the cores, so this is a floor of what a 2-vCPU Cloud Run"
        " instance, whose vCPUs are its own, gets.",
        "",
        "| store | RPC | workers | calls/s | server CPU µs/call | p50 ms | p99 ms | RSS MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for store, data in w["stores"].items():
        for method in ("GetTask", "CreateTask"):
            for workers in ("1", "2"):
                row = data[workers][method]
                lines.append(
                    f"| {store} | {method} | {workers} | {row['calls_per_s']:,.0f} |"
                    f" {row['server_cpu_us_per_call']:,.0f} | {row['p50_ms']} | {row['p99_ms']} |"
                    f" {data[workers]['rss_mb']:.0f} |"
                )
    sqlite = w["stores"].get("sqlite")
    if sqlite:
        get = sqlite["2"]["GetTask"]["calls_per_s"] / sqlite["1"]["GetTask"]["calls_per_s"]
        create = sqlite["2"]["CreateTask"]["calls_per_s"] / sqlite["1"]["CreateTask"]["calls_per_s"]
        lines += [
            "",
            f"Reading it: on SQLite, reads scale ({get:.2f}x here) but writes do not"
            f" ({create:.2f}x): the workers share one file, and SQLite lets one writer at a"
            " time hold it, so each process's group commit becomes one turn at the lock. On"
            " the emulator the JVM needs the same cores, so two workers gain nothing here.",
        ]
    return lines


def _watch_section(path: Path) -> list[str]:
    """WatchTasks latency, throughput and memory (`python -m bench.watch`), if run."""
    if not path.exists():
        return []
    w = json.loads(path.read_text())
    lines = [
        "",
        f"## WatchTasks (`python -m bench.watch`, {w['date']})",
        "",
        "One server process per store; the watchers, the writers and (for Firestore) the"
        " emulator share its 2 cores. Latency is an event's arrival minus the task's"
        " update_time (one machine, one clock). On the emulator each Listen snapshot is"
        " read again at its read time (the emulator's snapshots lag their read times):"
        " one extra query per snapshot that production does not pay.",
        "",
        "| store | watchers | updates | events | p50 ms | p99 ms | max ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for store, data in w["stores"].items():
        for row in data["latency"]:
            lines.append(
                f"| {store} | {row['watchers']} | {row['updates']} | {row['events']} |"
                f" {row['p50_ms']} | {row['p99_ms']} | {row['max_ms']} |"
            )
    lines += [
        "",
        "| store | watchers | writes/s | events/s delivered | server CPU µs/event |"
        " RSS idle, MB | with 1,000 idle watchers, MB | KB per watcher |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for store, data in w["stores"].items():
        t, idle = data["throughput"], data["idle"]
        lines.append(
            f"| {store} | {t['watchers']} | {t['writes_per_s']:,.0f} | {t['events_per_s']:,.0f} |"
            f" {t['server_cpu_us_per_event']:,.0f} | {idle['rss_before_mb']} |"
            f" {idle['rss_with_watchers_mb']} | {idle['kb_per_watcher']} |"
        )
    lines += [
        "",
        "Watchers that read nothing (64 KiB flow-control windows) while 2 KB tasks change:",
        "",
        "| store | watchers | updates | RSS before, MB | peak, MB | after, MB | how they ended |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for store, data in w["stores"].items():
        u = data["unread"]
        endings = ", ".join(f"{k} {v}" for k, v in sorted(u["endings"].items())) or "none"
        lines.append(
            f"| {store} | {u['watchers']} | {u['updates']} | {u['rss_before_mb']} |"
            f" {u['rss_peak_mb']} | {u['rss_after_mb']} | {endings} |"
        )
    fs = w["stores"].get("firestore", {}).get("unread", {})
    if fs.get("endings", {}).get("still open"):
        lines += [
            "",
            "On the emulator the unread Firestore watchers stayed open, at flat memory: the"
            " process re-reads each Listen snapshot there, falls behind, and merges the"
            " snapshots that wait (taskservice.store.firestore._watch), so the updates of 20"
            " tasks made fewer events than a stream may fall behind. The slow-reader test"
            " (tests/test_watch.py) ends one with WATCHER_TOO_SLOW on both stores.",
        ]
    lines += [
        "",
        "Each stream buffers at most TASKSERVICE_WATCH_BUFFER events (and 4 MiB) beyond"
        " what gRPC's flow control holds; a watcher that falls further behind is ended"
        " with RESOURCE_EXHAUSTED (WATCHER_TOO_SLOW) and a resume token, so memory stays"
        " bounded whatever the readers do.",
    ]
    return lines


def _telemetry_section(path: Path) -> list[str]:
    """Server CPU per GetTask with telemetry off and on (`python -m bench.telemetry`)."""
    if not path.exists():
        return []
    t = json.loads(path.read_text())
    lines = [
        "",
        f"## Telemetry (`python -m bench.telemetry`, {t['date']})",
        "",
        f"GetTask on SQLite, {t['inflight']} calls in flight over {t['connections']}"
        f" connections (h2load, no trace headers), {t['calls_per_round']:,} calls per round;"
        f" each row is the median of {t['rounds']} rounds that alternate the settings."
        " On: OTLP to a collector on loopback, metrics every 10 s. CPU is the server"
        " process's own.",
        "",
        "| telemetry | calls/s | server CPU µs/call | vs off | p50 ms | p99 ms | RSS MB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in t["modes"].items():
        lines.append(
            f"| {name} | {row['calls_per_s']:,.0f} | {row['server_cpu_us_per_call']:,.0f} |"
            f" {row['cpu_vs_off']:.2f}x | {row['p50_ms']} | {row['p99_ms']} | {row['rss_mb']:.0f} |"
        )
    on = t["modes"]["on"]["cpu_vs_off"]
    lines += [
        "",
        f"With the default sampling (1% of the calls that carry no trace header), telemetry"
        f" costs {100 * (on - 1):+.0f}% CPU per call (target: at most +15%). Metrics alone"
        " cost next to nothing (one bisect per call into histograms kept in the process);"
        " a traced call costs about 250 µs more (its span, and exporting it from Python),"
        " which is the last row: a caller that samples every call pays that on each.",
    ]
    return lines


def _stages_section(path: Path) -> list[str]:
    """The budget per stage of a call (`python -m bench.stages`)."""
    if not path.exists():
        return []
    t = json.loads(path.read_text())
    builds = t["builds"]
    echo = builds["echo"]["cpu_us_per_call"]
    lines = [
        "",
        f"## Where a call's CPU goes (`python -m bench.stages`, {t['when']})",
        "",
        "TaskService on SQLite built with one stage at a time switched off"
        " (bench/_stage_server.py), the echo, and an echo that reads its one request"
        " message as TaskService's pipeline does; all run at once and are loaded in"
        f" turn, {t['inflight']} calls in flight, {t['calls_per_round']:,} calls a round,"
        f" {t['rounds']} alternating rounds. Server CPU per call (every thread of the"
        " process), median of the rounds.",
        "",
        "| build | server CPU µs/call | vs echo | calls/s |",
        "| --- | --- | --- | --- |",
    ]
    for name, b in builds.items():
        cpu = b["cpu_us_per_call"]
        lines.append(f"| {name} | {cpu:.0f} | {cpu / echo:.2f}x | {b['calls_per_s']:,.0f} |")
    lines += [
        "",
        "A stage's cost is the difference of two builds that differ by it alone"
        " (bench/stages.py lists which); a difference within ±15 µs is the"
        " machine's noise.",
        "",
        "| stage | GetTask µs | CreateTask µs |",
        "| --- | --- | --- |",
    ]
    get, create = t["stages"].get("GetTask", {}), t["stages"].get("CreateTask", {})
    for stage in dict.fromkeys([*get, *create]):
        g, c = get.get(stage), create.get(stage)
        lines.append(
            f"| {stage} | {'' if g is None else f'{g:.0f}'} | {'' if c is None else f'{c:.0f}'} |"
        )
    inproc = ", ".join(f"{k} {v} µs" for k, v in t["in_process_us"].items())
    lines += ["", f"Protobuf in-process (timeit): {inproc}."]
    return lines


def _int_keys(o: Any) -> Any:
    """JSON turns the in-flight keys (1, 16, 64) into strings; turn them back."""
    if isinstance(o, dict):
        return {(int(k) if k.isdigit() else k): _int_keys(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_int_keys(x) for x in o]
    return o


if __name__ == "__main__":
    # python -m bench.report [docs/reports/benchmarks.json]: re-render the Markdown and
    # the chart from a run's raw figures (after changing this module, say).
    import sys

    source = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/reports/benchmarks.json")
    written = write_report(_int_keys(json.loads(source.read_text())), source.parent)
    print("wrote " + ", ".join(str(p) for p in written))
