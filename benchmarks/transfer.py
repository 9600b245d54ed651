"""Benchmark one refit through rollout.transfer against the two-copy floor on the same device.

Run from the repo root (config: benchmarks/conf/transfer.yaml):
    python -m benchmarks.transfer                                   # one configuration, prints a table
    python -m benchmarks.transfer -m rollout.transfer.bucket_mb=16,64,256 rollout.transfer.sync=fenced,double_buffer
    python -m benchmarks.transfer --summary multirun/<date>/<time>  # sweep table + summary.png + summary.json

A synthetic state dict with Qwen2-like shapes (embedding, q/k/v with biases, o, gate/up/down, norms;
`bench.hidden_size` sets the width, layers are added up to `bench.total_gb`) lives in a sender
process; a receiver process owns preallocated destination tensors. Per repeat, the sender process
measures, alternately:
  floor: the two unavoidable copies with torch copy_, tensor by tensor, on that device — pack each
         bucket (same layout and bucket size as the refit) into a buffer, then copy the buffer's
         views into destination tensors;
  refit: WeightSender.send() to the receiver process, whose consume copies each view into its
         destination (send() returns once the receiver has consumed the last bucket).
With `rollout.transfer.transport=nccl bench.device=cuda` the case is standalone mode: sender on cuda:0,
receiver on cuda:1, and the floor has three copies — pack on cuda:0, the cuda:0 -> cuda:1 peer copy,
load on cuda:1:
    python -m benchmarks.transfer rollout.transfer.transport=nccl bench.device=cuda bench.total_gb=15
With `rollout.transfer.mode=direct` there is no bucket: the receiver reads the sender's own tensors, so the
floor is ONE copy — every tensor copy_'d once into its destination tensor, in the sender process:
    python -m benchmarks.transfer rollout.transfer.mode=direct
Memory of the transfer, measured in both modes: the proportional set size (anonymous + shared memory, from
/proc/<pid>/smaps_rollup) of sender and receiver together, after the refits minus before the first one
(shared pages count once between the two); the sender's own resident anonymous + shared memory, after minus
before; its resident peak above its start (VmHWM after clear_refs); on a GPU the sender's torch.cuda allocation.
Both run with `bench.num_threads` torch threads per process (1 by default: on a 2-core machine the
two processes otherwise fight for the cores). The JSON (`bench.out` in Hydra's output directory)
holds medians, GB/s, the ratio refit/floor and the overhead per bucket.
"""

from __future__ import annotations

import glob
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch

from benchmarks import hydra_app, register_schema
from rollout.transfer import TransferConfig, WeightReceiver, WeightSender, layout, new_endpoint
from rollout.transfer.config import TransferMode, Transport

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


@dataclass
class BenchConfig:
    total_gb: float = 2.0
    dtype: str = "bfloat16"
    device: str = "cpu"
    hidden_size: int = 1536  # Qwen2-1.5B; the embedding (vocab 151936) is then 0.47 GB in bf16
    num_repeats: int = 5
    num_threads: int = 1
    out: str = "bench.json"
    trace: bool = (
        False  # after the timed repeats, one more refit with a per-bucket timeline (see _Trace)
    )
    timeout_s: float = 1800.0  # the whole run: both processes' results must be in by then


@dataclass
class BenchRollout:
    # shm between two CPU processes unless told otherwise; a long timeout for GB-sized sweeps on a busy host
    transfer: TransferConfig = field(
        default_factory=lambda: TransferConfig(transport=Transport.shm, timeout_s=120.0)
    )


@dataclass
class BenchRoot:
    rollout: BenchRollout = field(default_factory=BenchRollout)
    bench: BenchConfig = field(default_factory=BenchConfig)


def qwen2_like_shapes(
    total_bytes: int, hidden: int, itemsize: int
) -> list[tuple[str, tuple[int, ...]]]:
    """Embedding first, then whole decoder layers while they fit in `total_bytes`, then the final norm."""
    inter = max(128, round(hidden * 35 / 6 / 128) * 128)  # 1536 -> 8960, as in Qwen2-1.5B
    kv = 128 * max(1, hidden // 768)  # two KV heads of 128 at 1536
    vocab = max(
        1024, min(151936, total_bytes // 4 // (hidden * itemsize))
    )  # at most a quarter of the total
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab, hidden))]
    layer = [
        ("self_attn.q_proj.weight", (hidden, hidden)),
        ("self_attn.q_proj.bias", (hidden,)),
        ("self_attn.k_proj.weight", (kv, hidden)),
        ("self_attn.k_proj.bias", (kv,)),
        ("self_attn.v_proj.weight", (kv, hidden)),
        ("self_attn.v_proj.bias", (kv,)),
        ("self_attn.o_proj.weight", (hidden, hidden)),
        ("mlp.gate_proj.weight", (inter, hidden)),
        ("mlp.up_proj.weight", (inter, hidden)),
        ("mlp.down_proj.weight", (hidden, inter)),
        ("input_layernorm.weight", (hidden,)),
        ("post_attention_layernorm.weight", (hidden,)),
    ]
    layer_bytes = sum(torch.Size(s).numel() for _, s in layer) * itemsize
    used = vocab * hidden * itemsize
    i = 0
    while i == 0 or used + layer_bytes <= total_bytes:
        shapes += [(f"model.layers.{i}.{name}", s) for name, s in layer]
        used += layer_bytes
        i += 1
    return shapes + [("model.norm.weight", (hidden,))]


def _tensors(shapes, dtype: torch.dtype, device: str, value: float) -> dict[str, torch.Tensor]:
    # fill_ touches every page now, so no measurement pays for first-touch page faults
    return {
        name: torch.empty(shape, dtype=dtype, device=device).fill_(value) for name, shape in shapes
    }


def _sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _devices(cfg: TransferConfig, bench: BenchConfig) -> tuple[str, str]:
    """(sender, receiver) devices: both bench.device, except nccl on cuda, which spans two GPUs."""
    if cfg.transport == Transport.nccl and torch.device(bench.device).type == "cuda":
        return "cuda:0", "cuda:1"
    return bench.device, bench.device


def _floor_once(
    state: dict,
    dests: dict,
    bucket: torch.Tensor,
    bucket_bytes: int,
    device: str,
    peer: torch.Tensor | None = None,
) -> float:
    """`peer`: a bucket on the destinations' device when it is not the sender's (the third copy)."""
    start = time.perf_counter()
    for planned in layout.plan_buckets(state.items(), bucket_bytes):
        layout.pack(planned, bucket, bucket_bytes)
        loaded = bucket
        if peer is not None:
            peer[: planned.nbytes].copy_(bucket[: planned.nbytes])
            loaded = peer
        layout.unpack_into(planned, loaded, dests, bucket_bytes)
        _sync(device)
        if peer is not None:
            _sync(peer.device)
    return time.perf_counter() - start


def _one_copy_floor(state: dict, dests: dict, device: str) -> float:
    """The least any refit can cost: each tensor copied once into its destination, tensor by tensor."""
    start = time.perf_counter()
    for name, t in state.items():
        dests[name].copy_(t)
    _sync(device)
    return time.perf_counter() - start


def _memory(device: str) -> dict[str, int]:
    """This process's memory in bytes: Pss of anonymous + shared memory, resident peak and now; CUDA allocations."""
    with open("/proc/self/smaps_rollup") as f:
        kb = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f.readlines()[1:])}
    with open("/proc/self/status") as f:
        status = {
            k: int(v.split()[0])
            for k, v in (line.split(":", 1) for line in f if line.startswith(("Vm", "Rss")))
        }
    out = {
        "pss": (kb["Pss_Anon"] + kb["Pss_Shmem"]) << 10,
        "rss": status["VmRSS"] << 10,
        "rss_peak": status["VmHWM"] << 10,
        "anon_shmem": (status["RssAnon"] + status["RssShmem"]) << 10,
    }
    if torch.device(device).type == "cuda":
        out.update(
            cuda=torch.cuda.memory_allocated(device),
            cuda_peak=torch.cuda.max_memory_allocated(device),
        )
    return out


def _reset_peaks(device: str) -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _sender_main(cfg: TransferConfig, bench: BenchConfig, endpoint: str, shapes, results) -> None:
    torch.set_num_threads(bench.num_threads)
    dtype = _DTYPES[bench.dtype]
    device, receiver_device = _devices(cfg, bench)
    state = _tensors(shapes, dtype, device, 1.0)
    dests = _tensors(shapes, dtype, receiver_device, 0.0)
    direct = cfg.mode is TransferMode.direct
    if (
        not direct
    ):  # the two-copy floor's bucket, allocated before the memory baseline like the tensors
        bucket = torch.zeros(cfg.bucket_bytes, dtype=torch.uint8, device=device)
        peer = (
            None if receiver_device == device else torch.zeros_like(bucket, device=receiver_device)
        )
    floors, refits, num_buckets = [], [], 0
    trace = _Trace(device) if bench.trace else None
    memory = {"before": _memory(device)}
    _reset_peaks(device)
    with WeightSender(cfg, endpoint, device=device, on_step=trace and trace.on_step) as sender:
        for repeat in range(
            bench.num_repeats + 1
        ):  # repeat 0 warms up buffers, caches, page tables
            if direct:
                floor = _one_copy_floor(state, dests, device)
            else:
                floor = _floor_once(state, dests, bucket, cfg.bucket_bytes, device, peer)
            stats = sender.send(state.items(), version=repeat)
            if repeat:
                floors.append(floor)
                refits.append(stats.seconds)
            num_buckets, num_bytes = stats.num_buckets, stats.num_bytes
        memory["after"] = _memory(device)
        if trace:
            with trace:
                sender.send(state.items(), version=bench.num_repeats + 1)
    results.put(
        {
            "floor_s": floors,
            "refit_s": refits,
            "num_buckets": num_buckets,
            "num_bytes": num_bytes,
            "sender_memory": memory,
            "sender_trace": trace and trace.records(),
        }
    )


def _receiver_main(cfg: TransferConfig, bench: BenchConfig, endpoint: str, shapes, results) -> None:
    torch.set_num_threads(bench.num_threads)
    device = _devices(cfg, bench)[1]
    dests = _tensors(shapes, _DTYPES[bench.dtype], device, 0.0)

    def consume(weights, is_last):
        for name, view in weights:
            dests[name].copy_(view)

    trace = _Trace(device) if bench.trace else None
    memory = {"before": _memory(device)}
    with WeightReceiver(cfg, endpoint, device=device, on_step=trace and trace.on_step) as receiver:
        for _ in range(bench.num_repeats + 1):
            receiver.receive(consume)
        memory["after"] = _memory(device)
        if trace:
            with trace:
                receiver.receive(trace.timed("load", consume))
        results.put({"receiver_memory": memory, "receiver_trace": trace and trace.records()})


class _Trace:
    """Per-bucket timeline of one refit, for `bench.trace`: when each end took each step of each bucket (the
    steps its on_step argument hears, host time on the clock both processes share) and how long each pack /
    load ran on the device (CUDA events in its own process). Records only inside `with trace:`."""

    def __init__(self, device: str) -> None:
        self._cuda = torch.device(device).type == "cuda"
        self._recording = False
        self._host: list[tuple[str, int, float]] = []  # (step, bucket or -1, time)
        self._gpu: list[tuple[str, object, object]] = []  # (what, start event, end event)

    def __enter__(self):
        self._recording = True
        return self

    def __exit__(self, *exc) -> None:
        self._recording = False

    def on_step(self, step: str, bucket_index: int) -> None:
        if not self._recording:
            return
        self._host.append((step, bucket_index, time.monotonic()))
        if self._cuda and step == "pack start":
            self._pack_start = self._event()
        elif self._cuda and step == "pack end":
            self._gpu.append(("pack", self._pack_start, self._event()))

    def timed(self, what: str, fn):
        def wrapper(*args):
            self._host.append((f"{what} start", -1, time.monotonic()))
            start = self._event() if self._cuda else None
            fn(*args)
            self._host.append((f"{what} end", -1, time.monotonic()))
            if self._cuda:
                self._gpu.append((what, start, self._event()))

        return wrapper

    @staticmethod
    def _event():
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def records(self) -> dict:
        if self._cuda:
            torch.cuda.synchronize()
        return {
            "host": self._host,
            "gpu_ms": [(what, s.elapsed_time(e)) for what, s, e in self._gpu],
        }


def trace_table(sender: dict, receiver: dict) -> list[tuple[str, float]]:
    """Median over buckets 1.. of each step of the sender -> receiver -> sender cycle, in ms. Steps with no
    bucket index (the load's start and end) take the index of the step that follows them."""

    def by_bucket(host):
        out, pending = {}, []
        for what, index, t in host:
            if index < 0:
                pending.append((what, t))
                continue
            for w, tp in pending:
                out.setdefault(index, {})[w] = tp
            pending = []
            out.setdefault(index, {})[what] = t
        return out

    s, r = by_bucket(sender["host"]), by_bucket(receiver["host"])
    steps = [  # (label, from (end, key, bucket offset), to (end, key, bucket offset))
        ("sender: Ack in -> pack starts", (s, "got Ack", -1), (s, "pack start", 0)),
        ("sender: pack launch loop", (s, "pack start", 0), (s, "pack end", 0)),
        ("sender: launched -> Packed out", (s, "pack end", 0), (s, "send Packed", 0)),
        (
            "Packed on the wire (after the receiver's views)",
            (s, "send Packed", 0),
            (r, "got Packed", 0),
        ),
        ("receiver: wait for the packed event", (r, "got Packed", 0), (r, "load start", 0)),
        ("receiver: load launch loop", (r, "load start", 0), (r, "load end", 0)),
        ("receiver: device sync after the loads", (r, "load end", 0), (r, "send Ack", 0)),
        ("Ack on the wire (incl. the sender's wake-up)", (r, "send Ack", 0), (s, "got Ack", 0)),
    ]

    def median_span(a: dict, ka: str, da: int, b: dict, kb: str, db: int) -> float:
        """Median over buckets k >= 1 of b[k + db][kb] - a[k + da][ka], in ms."""
        spans = [
            (b[k + db][kb] - a[k + da][ka]) * 1e3
            for k in range(1, len(s))
            if ka in a.get(k + da, {}) and kb in b.get(k + db, {})
        ]
        return statistics.median(spans) if spans else float("nan")

    rows = [(label, median_span(*start, *end)) for label, start, end in steps]
    # on a CPU the copies run inside the launch loops
    pack = statistics.median(ms for w, ms in sender["gpu_ms"]) if sender["gpu_ms"] else rows[1][1]
    load = (
        statistics.median(ms for w, ms in receiver["gpu_ms"]) if receiver["gpu_ms"] else rows[5][1]
    )
    cycle = median_span(s, "got Ack", -1, s, "got Ack", 0)
    return rows + [
        ("= one bucket, Ack to Ack", cycle),
        ("device time: pack", pack),
        ("device time: load", load),
        ("device idle per bucket (cycle - pack - load)", cycle - pack - load),
        (
            "(off the path) BucketMeta in -> Packed in",
            median_span(r, "got BucketMeta", 0, r, "got Packed", 0),
        ),
    ]


def run(cfg: TransferConfig, bench: BenchConfig) -> dict:
    """Measure floor and refit for one configuration; returns the result dict (also the JSON)."""
    import multiprocessing as mp

    torch.set_num_threads(bench.num_threads)
    dtype = _DTYPES[bench.dtype]
    shapes = qwen2_like_shapes(int(bench.total_gb * 1e9), bench.hidden_size, dtype.itemsize)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    endpoint = new_endpoint()
    receiver = ctx.Process(
        target=_receiver_main, args=(cfg, bench, endpoint, shapes, results), daemon=True
    )
    sender = ctx.Process(
        target=_sender_main, args=(cfg, bench, endpoint, shapes, results), daemon=True
    )
    receiver.start()
    sender.start()
    try:
        out = {}
        for _ in range(2):  # each process reports its own part
            out.update(results.get(timeout=bench.timeout_s))
    finally:
        for p in (sender, receiver):
            p.join(30)
            if p.is_alive():
                p.kill()
    floor_s, refit_s = statistics.median(out["floor_s"]), statistics.median(out["refit_s"])
    gb = out["num_bytes"] / 1e9
    direct = cfg.mode is TransferMode.direct
    return {
        "mode": cfg.mode.value,
        "floor": "one-copy" if direct else "two-copy",
        "transport": cfg.transport.value,
        "sync": "-" if direct else cfg.sync.value,
        "bucket_mb": "-" if direct else cfg.bucket_mb,
        "device": bench.device,
        "sender_device": _devices(cfg, bench)[0],
        "receiver_device": _devices(cfg, bench)[1],
        "dtype": bench.dtype,
        "num_threads": bench.num_threads,
        "total_gb": round(gb, 4),
        "num_tensors": len(shapes),
        "num_buckets": out["num_buckets"],
        "num_repeats": bench.num_repeats,
        "floor_s": floor_s,
        "refit_s": refit_s,
        "floor_gbps": gb / floor_s,
        "refit_gbps": gb / refit_s,
        "ratio": refit_s / floor_s,
        "overhead_per_bucket_ms": (refit_s - floor_s) / out["num_buckets"] * 1e3
        if out["num_buckets"]
        else None,
        **_memory_figures(out["sender_memory"], out["receiver_memory"]),
        "floor_all_s": out["floor_s"],
        "refit_all_s": out["refit_s"],
        **(
            {"trace_ms": trace_table(out["sender_trace"], out["receiver_trace"])}
            if bench.trace
            else {}
        ),
    }


def _memory_figures(sender: dict, receiver: dict) -> dict:
    """MB the transfer holds: both processes' Pss after the refits minus before (physical memory, shared pages
    once); the sender's resident anonymous + shared memory after minus before; its resident peak above its start."""
    mb = lambda n: n / 2**20  # noqa: E731
    figures = {
        "transfer_memory_mb": mb(
            sender["after"]["pss"]
            + receiver["after"]["pss"]
            - sender["before"]["pss"]
            - receiver["before"]["pss"]
        ),
        "sender_memory_mb": mb(
            sender["after"]["anon_shmem"] - sender["before"]["anon_shmem"]
        ),  # its own, unshared
        "sender_peak_over_start_mb": mb(sender["after"]["rss_peak"] - sender["before"]["rss"]),
    }
    if "cuda" in sender["before"]:
        figures["sender_cuda_mb"] = mb(sender["after"]["cuda"] - sender["before"]["cuda"])
        figures["sender_cuda_peak_over_start_mb"] = mb(
            sender["after"]["cuda_peak"] - sender["before"]["cuda"]
        )
    return figures


_COLUMNS = [  # (result key, header, format)
    ("mode", "mode", "{}"),
    ("transport", "transport", "{}"),
    ("sync", "sync", "{}"),
    ("bucket_mb", "bucket MB", "{}"),
    ("num_buckets", "buckets", "{}"),
    ("floor_s", "floor s", "{:.3f}"),
    ("refit_s", "refit s", "{:.3f}"),
    ("floor_gbps", "floor GB/s", "{:.2f}"),
    ("refit_gbps", "refit GB/s", "{:.2f}"),
    ("ratio", "refit/floor", "{:.2f}"),
    ("overhead_per_bucket_ms", "ms/bucket", "{:.2f}"),
    ("floor", "floor", "{}"),
    ("transfer_memory_mb", "transfer MB", "{:.0f}"),
    ("sender_peak_over_start_mb", "sender peak MB", "{:.0f}"),
]


def print_table(rows: list[dict], title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for _, header, _ in _COLUMNS:
        table.add_column(header, justify="right")
    for row in rows:
        table.add_row(
            *(
                fmt.format(row[key]) if row.get(key) not in (None, "-") else "-"
                for key, _, fmt in _COLUMNS
            )
        )
    Console(width=max(150, Console().width)).print(table)


def summarize(sweep_dir: str) -> list[dict]:
    """Collect every result JSON under a multirun directory: table, summary.json and summary.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = []
    for path in sorted(glob.glob(os.path.join(sweep_dir, "**", "*.json"), recursive=True)):
        with open(path) as f:
            row = json.load(f)
        if isinstance(row, dict) and "refit_s" in row:
            rows.append(row)
    if not rows:
        raise SystemExit(f"no benchmark results under {sweep_dir}")
    rows.sort(
        key=lambda r: (
            r.get("mode", "bucketed"),
            r["transport"],
            r["sync"],
            str(r["bucket_mb"]).zfill(6),
        )
    )
    print_table(
        rows,
        f"refit vs floor: two-copy (bucketed), one-copy (direct) ({rows[0]['total_gb']} GB "
        f"{rows[0]['dtype']}, {rows[0]['device']})",
    )
    with open(os.path.join(sweep_dir, "summary.json"), "w") as f:
        json.dump(rows, f, indent=1)
    fig, (ax_gbps, ax_ratio) = plt.subplots(1, 2, figsize=(10, 4))
    for r in [r for r in rows if r.get("mode") == "direct"]:  # no bucket: one line across the sizes
        ax_gbps.axhline(r["refit_gbps"], ls="--", color="C9", label=f"{r['transport']} direct")
        ax_ratio.axhline(
            r["ratio"], ls="--", color="C9", label=f"{r['transport']} direct (vs one-copy floor)"
        )
    rows = [r for r in rows if r.get("mode", "bucketed") == "bucketed"]
    for key in sorted({(r["transport"], r["sync"]) for r in rows}):
        sel = [r for r in rows if (r["transport"], r["sync"]) == key]
        mbs = [r["bucket_mb"] for r in sel]
        ax_gbps.plot(mbs, [r["refit_gbps"] for r in sel], "o-", label=f"{key[0]} {key[1]}")
        ax_ratio.plot(mbs, [r["ratio"] for r in sel], "o-", label=f"{key[0]} {key[1]}")
    ax_gbps.plot(
        [r["bucket_mb"] for r in rows],
        [r["floor_gbps"] for r in rows],
        "k.",
        label="two-copy floor (each run)",
    )
    ax_gbps.set(xscale="log", xlabel="bucket_mb", ylabel="GB/s", title="refit throughput")
    ax_ratio.axhline(1.0, color="k", lw=0.8)
    ax_ratio.set(
        xscale="log",
        xlabel="bucket_mb",
        ylabel="refit / floor (same run)",
        title="ratio to the two-copy floor",
    )
    ax_gbps.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(sweep_dir, "summary.png"), dpi=120)
    return rows


def _register() -> None:
    register_schema("transfer", BenchRoot)


def _report(result: dict, path: str) -> None:
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print_table([result], f"refit vs {result['floor']} floor -> {path}")
    for label, ms in result.get("trace_ms", []):
        print(f"{label:>48}: {ms:8.3f} ms")


_hydra_main = hydra_app(
    "transfer", BenchRoot, lambda root: run(root.rollout.transfer, root.bench), _report
)

if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--summary":
        summarize(sys.argv[2])
    else:
        _hydra_main()
