"""`d2v plan`: per-GPU and per-host memory and the expected step time of a run, before renting it.

The bytes come from memory.py (model states, activations, the window pass) and teacher/placement.py
(each teacher placement's bytes and traffic), counted per parameter from the real model built on the
meta device (so ZeRO-3's per-parameter padding to a multiple of the world size is exact); ZeRO-3 adds
the largest layer gathered at once. DeepSpeed's own estimators are printed beside for comparison. The
teacher table prints, per placement, the bytes per optimizer step over PCIe, through host memory,
between GPUs and through device memory, and which one `--teacher.placement=auto` picks.
"""
from __future__ import annotations

import math
import os
import time

import torch

from .. import dist as dist_mod
from ..config import with_vocab
from ..student import build_model
from ..data import synthetic_batch
from ..dist import print0
from ..dsconfig import offloads_optimizer, zero_stage
from ..engine import build_engine
from ..flops import step_flops_per_sample
from ..models import ENCODERS, token_grid
from ..memory import activation_bytes, model_states, placements, window_bytes, window_size
from ..teacher import teacher_copy
from ..teacher.placement import LINKS, choose, link_seconds, teacher_traffic
from ..train import train_step

GB = 1024 ** 3


def _meta_model(cfg):
    with torch.device("meta"):
        model = build_model(with_vocab(cfg))
        teacher = teacher_copy(model.encoder)          # data2vec 1: without the modules it reads from the student
    return model, teacher


def plan(cfg, nodes: int, gpus_per_node: int, zero: int, micro_batch: int, offload_teacher: bool = True,
         offload_optimizer: bool = False, checkpointing: bool = False, mfu: float = 0.4,
         peak_tflops: float = 989.0, bf16: bool = True, placement: str = "", gpu_gb: float = 80.0) -> dict:
    """`placement`: the teacher's (default: host with offload_teacher, else replicated); auto picks the
    cheapest in traffic whose device total fits `gpu_gb`."""
    world = nodes * gpus_per_node
    model, teacher = _meta_model(cfg)
    s_numels = [p.numel() for p in model.parameters() if p.requires_grad]
    t_numels = [p.numel() for p in teacher.parameters()]
    block = sum(p.numel() for p in teacher.blocks[0].parameters())
    largest = max(s_numels)
    gas = max(1, cfg.data.global_batch // (micro_batch * world)) if cfg.data.global_batch else 1
    table = placements(cfg, s_numels, t_numels, block, world, zero, bf16, offload_optimizer, micro_batch, gas,
                       checkpointing)
    auto = choose({k: v["traffic"] for k, v in table.items()}, {k: v["device_total"] for k, v in table.items()},
                  gpu_gb * GB)
    placement = placement or ("host" if offload_teacher else "replicated")
    placement = auto if placement == "auto" else "host" if placement == "sharded" else placement
    ours = model_states(s_numels, t_numels, world, zero, bf16, offload_optimizer, placement, block)
    if zero >= 3:
        ours["device"]["gathered working set (largest layer x2)"] = (2 if bf16 else 4) * 2 * largest
    acts = activation_bytes(cfg, micro_batch, checkpointing)
    acts_nockpt = activation_bytes(cfg, micro_batch, False)
    window = window_size(cfg, micro_batch, gas, 2 if bf16 else 4)
    acts["teacher window pass (targets held)"] = window_bytes(cfg, micro_batch, window, 2 if bf16 else 4)
    note = None
    if cfg.data.global_batch and micro_batch * gas * world != cfg.data.global_batch:
        note = (f"the preset's global batch is {cfg.data.global_batch}; micro batch {micro_batch} x {world} GPUs "
                f"gives {micro_batch * gas * world} (choose micro x world x accumulation = {cfg.data.global_batch})")
    T, E = math.prod(token_grid(cfg)), ENCODERS[cfg.model.modality].num_extra_tokens
    src = cfg.data.max_sample_size if cfg.model.modality == "audio" else 0     # waveform samples (audio CNN)
    flops = step_flops_per_sample(cfg, T, E, src)["total"]
    step_s = flops * micro_batch * gas / (mfu * peak_tflops * 1e12)
    # fairseq: DDP, fp16 params/grads + fp32 master + Adam on every GPU, fp16 + fp32 teacher on every GPU
    fairseq = model_states(s_numels, t_numels, world, 0, True, False, "replicated")
    fairseq_acts = activation_bytes(cfg, micro_batch, False, flash=False)
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs
    total = sum(s_numels)
    if zero >= 3:
        ds_cpu, ds_gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus_per_node, nodes,
                                                                  cpu_offload=offload_optimizer,
                                                                  cpu_offload_params=False, zero_init=False,
                                                                  additional_buffer_factor=1.0)
    else:
        ds_cpu, ds_gpu = estimate_zero2_model_states_mem_needs(total, gpus_per_node, nodes,
                                                               cpu_offload=offload_optimizer, additional_buffer_factor=1.0)
    return {"traffic": {k: v["traffic"] for k, v in table.items()}, "placements": table, "auto": auto,
            "placement": placement, "window": window, "gpu_gb": gpu_gb, "links": dict(LINKS),
            "world": world, "gas": gas, "global_batch": micro_batch * gas * world, "student_params": total,
            "teacher_params": sum(t_numels), "ours": ours, "activations": acts, "activations_no_ckpt": acts_nockpt,
            "fairseq": fairseq, "fairseq_activations": fairseq_acts, "flops_per_sample": flops, "step_s": step_s,
            "samples_per_s": micro_batch * gas * world / step_s, "deepspeed_estimate_gpu": ds_gpu,
            "deepspeed_estimate_cpu": ds_cpu, "gpus_per_node": gpus_per_node, "note": note}


def print_plan(p: dict, cfg, args: dict) -> None:
    def block(title, states, acts):
        dev = sum(states["device"].values())
        act = sum(acts.values())
        print(f"  {title}")
        for k, v in states["device"].items():
            print(f"    GPU  {k:<40} {v / GB:9.2f} GiB")
        for k, v in acts.items():
            print(f"    GPU  activations: {k:<27} {v / GB:9.2f} GiB")
        print(f"    GPU  total{'':<35} {(dev + act) / GB:9.2f} GiB")
        host = sum(states["host"].values())
        for k, v in states["host"].items():
            print(f"    host {k:<40} {v / GB:9.2f} GiB per rank")
        print(f"    host total per node ({p['gpus_per_node']} ranks){'':<17} {host * p['gpus_per_node'] / GB:9.2f} GiB")
        return dev + act

    print(f"\nd2v plan: {cfg.preset} | {p['student_params'] / 1e6:.1f}M student / {p['teacher_params'] / 1e6:.1f}M teacher "
          f"params | {args['nodes']} nodes x {args['gpus_per_node']} GPUs | ZeRO-{args['zero']} | micro batch "
          f"{args['micro_batch']} x accumulation {p['gas']} = global {p['global_batch']} | clones {cfg.mask.clone_batch}")
    if p["note"]:
        print(f"  note: {p['note']}")
    ours = block(f"d2v_scale (teacher {p['placement']}"
                 f"{', optimizer offloaded' if args['offload_optimizer'] else ''}"
                 f"{', activation checkpointing' if args['checkpointing'] else ''})", p["ours"], p["activations"])
    if args["checkpointing"]:
        print(f"    (without activation checkpointing the student blocks need "
              f"{p['activations_no_ckpt']['student blocks'] / GB:.2f} GiB)")
    fair = block("fairseq-style (DDP, fp16 params + fp32 master + Adam on every GPU, fp16 + fp32 teacher on every "
                 "GPU, explicit attention, no checkpointing)", p["fairseq"], p["fairseq_activations"])
    print(f"  model states vs DeepSpeed's estimator (student only, ZeRO-{args['zero']}): ours "
          f"{sum(v for k, v in p['ours']['device'].items() if not k.startswith('teacher')) / GB:.2f} GiB GPU, "
          f"DeepSpeed {p['deepspeed_estimate_gpu'] / GB:.2f} GiB GPU / {p['deepspeed_estimate_cpu'] / GB:.2f} GiB host")
    print(f"  per-GPU total: d2v_scale {ours / GB:.1f} GiB vs fairseq-style {fair / GB:.1f} GiB")
    passes = next(iter(p["placements"].values()))["passes"]
    print(f"  teacher placements: bytes per optimizer step and rank ({passes} teacher pass{'es' if passes > 1 else ''} "
          f"per step, {p['window']} micro-batches each; ms at pcie {p['links']['pcie']:.0f}, host "
          f"{p['links']['host']:.0f}, gpu {p['links']['gpu']:.0f}, gather {p['links']['gather']:.0f} GB/s):")
    print(f"    {'placement':<21} {'PCIe GB':>8} {'host mem GB':>11} {'GPU-GPU GB':>10} {'GPU mem GB':>13} "
          f"{'teacher GiB GPU/host':>21} {'GPU total GiB':>13}  fits {p['gpu_gb']:.0f} GiB   time")
    for kind, row in p["placements"].items():
        t, secs = row["traffic"], link_seconds(row["traffic"], p["links"])
        fits = "yes" if row["device_total"] <= p["gpu_gb"] * GB else "no"
        mark = " <- auto" if kind == p["auto"] else ""
        print(f"    {kind:<21} {t['pcie'] / 1e9:8.3f} {t['host'] / 1e9:11.3f} {t['gather'] / 1e9:10.3f} {t['gpu'] / 1e9:13.3f} "
              f"{row['teacher_device'] / GB:10.2f}/{row['teacher_host'] / GB:<10.2f} {row['device_total'] / GB:13.1f}  "
              f"{fits:<13} +{sum(secs.values()) * 1e3:.1f} ms{mark}")
    print(f"  compute: {p['flops_per_sample'] / 1e12:.2f} TFLOP per sample (student x3 + teacher forward); at "
          f"{args['mfu']:.0%} MFU of {args['peak_tflops']:.0f} TFLOP/s: {p['step_s']:.2f} s per step, "
          f"{p['samples_per_s']:.0f} samples/s, {p['samples_per_s'] / (args['nodes'] * args['gpus_per_node']):.1f} per GPU")


def measure(engine, teacher) -> dict:
    """Per-rank bytes as allocated: student params / grads / optimizer states, teacher (after a step)."""
    def nbytes(ts):
        seen, total = set(), 0
        for t in ts:
            if t is None or t.data_ptr() in seen or t.numel() == 0:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return total, seen

    params = [p.ds_tensor if hasattr(p, "ds_tensor") else p.data for p in engine.module.parameters()]
    p_bytes, p_ptrs = nbytes(params)
    opt = engine.optimizer
    master = getattr(opt, "fp32_partitioned_groups_flat", None) or getattr(opt, "single_partition_of_fp32_groups", None) or []
    m_bytes, _ = nbytes([t for t in master if t.data_ptr() not in p_ptrs])
    inner = getattr(opt, "optimizer", opt)
    states = [v for st in inner.state.values() for v in st.values() if torch.is_tensor(v) and v.numel() > 1]
    s_bytes, _ = nbytes(states)
    if getattr(opt, "grad_partitions_flat_buffer", None) is not None:          # ZeRO-3
        grads_list = [opt.grad_partitions_flat_buffer]
    elif getattr(opt, "averaged_gradients", None):                            # ZeRO-2 partitions
        grads_list = [g for gs in opt.averaged_gradients.values() for g in gs]
    else:                                                                     # ZeRO-0/1: full grads
        grads_list = [p.grad for p in engine.module.parameters()]
    g_bytes, _ = nbytes(grads_list)
    if teacher.sharded:
        t_bytes, t_ptrs = nbytes(teacher.low)
    else:
        t_bytes, t_ptrs = nbytes(list(teacher.module.parameters()))
    a_bytes, _ = nbytes([a for a in teacher.fp32 if a.data_ptr() not in t_ptrs])
    return {"student params": p_bytes, "fp32 grads": g_bytes, "fp32 master": m_bytes, "Adam moments": s_bytes,
            "teacher": t_bytes, "teacher fp32": a_bytes}


def measure_and_compare(cfg, ds_over: dict, micro: int) -> dict:
    """Build the real student and teacher on this world (launch under `deepspeed`), run one training
    step, and print each state's bytes per rank (taken just before the optimizer step, when the
    gradients are alive) next to the planner's prediction."""
    cfg.data.batch_size, cfg.data.global_batch = micro, 0
    with_vocab(cfg)
    dist = dist_mod.init()
    built = build_engine(cfg, dist, ds_overrides=ds_over)
    engine, teacher, dtype, ds = built.engine, built.teacher, built.dtype, built.ds
    step, taken = engine.step, {}

    def measured_step(*a, **kw):                 # gradients exist between backward and the step
        taken.update(measure(engine, teacher))
        return step(*a, **kw)

    batch = synthetic_batch(cfg)
    train_step(engine, teacher, batch, cfg, 0, 0, dist, dtype)      # the first step allocates Adam's moments
    engine.step = measured_step
    train_step(engine, teacher, batch, cfg, 1, 0, dist, dtype)
    engine.step = step
    measured = taken
    zero, offload_opt = zero_stage(ds), offloads_optimizer(ds)
    kind = teacher.placement if teacher.sharded else "replicated"
    model, t = _meta_model(cfg)
    pred = model_states([p.numel() for p in model.parameters() if p.requires_grad],
                        [p.numel() for p in t.parameters()], dist.world, zero, dtype == torch.bfloat16,
                        offload_opt, kind)
    flat = {**pred["device"], **pred["host"]}
    rows = [("student params", flat.get("student params", 0)),
            ("fp32 grads", flat.get("fp32 grads", 0) + flat.get("16-bit grads", 0)),
            ("fp32 master", flat.get("fp32 master", 0)), ("Adam moments", flat.get("Adam moments", 0)),
            ("teacher", flat.get("teacher", 0) + flat.get("teacher compute slice", 0)),
            ("teacher fp32", flat.get("teacher fp32 accumulators", 0) + flat.get("teacher fp32 slice", 0))]
    print0(f"\nd2v plan --measure: {cfg.preset}, {dist.world} ranks, ZeRO-{zero}, {str(dtype)[6:]}, teacher {kind}"
           f" (rank 0, bytes)")
    print0(f"  {'state':<16} {'measured':>12} {'planned':>12}")
    for name, planned in rows:
        print0(f"  {name:<16} {measured[name]:>12,d} {planned:>12,d}")
    ema = _measure_ema(engine, teacher, cfg, dist, dtype == torch.bfloat16, zero, offload_opt)
    return {"measured": measured, "planned": dict(rows), "ema": ema}


def host_bandwidth(n: int = 1 << 24, reps: int = 5) -> float:
    """Bytes/s of this process copying fp32 on the host (read + write counted), best of `reps`."""
    a, b = torch.randn(n), torch.empty(n)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        b.copy_(a)
        best = min(best, time.perf_counter() - t0)
    return 2 * 4 * n / best


def _measure_ema(engine, teacher, cfg, dist, bf16: bool, zero: int, offload_opt: bool) -> dict:
    """The EMA update of the real teacher, timed, beside the planner's traffic for it at the host
    bandwidth measured now (on a CPU run every link is host memory)."""
    reps = 3
    teacher.update(engine.module.encoder, 0.999)
    teacher.wait()
    t0 = time.perf_counter()
    for _ in range(reps):
        teacher.update(engine.module.encoder, 0.999)
        teacher.wait()
    measured = (time.perf_counter() - t0) / reps
    kind = teacher.placement if teacher.sharded else "replicated"
    numels = [math.prod(shape) for shape in getattr(teacher, "shapes", {}).values()] or \
        [p.numel() for p in teacher.module.parameters()]
    traffic = teacher_traffic(numels, dist.world, 0, bf16, kind, zero, master_on_host=dist.device.type != "cuda"
                              or offload_opt)                            # no pass: the EMA alone
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    bw = host_bandwidth() / max(1, local) if dist.device.type != "cuda" else None   # the ranks share it
    planned = sum(traffic.values()) / bw if bw else sum(link_seconds(traffic, LINKS).values())
    print0(f"  EMA update ({kind} teacher): measured {measured * 1e3:.1f} ms, planned {planned * 1e3:.1f} ms "
           f"({sum(traffic.values()) / 1e6:.1f} MB of traffic" + (f" at {bw / 1e9:.1f} GB/s per rank: host bandwidth measured now / {local} ranks)"
                                                                  if bw else ")"))
    return {"measured_s": measured, "planned_s": planned, "bytes": sum(traffic.values())}
