"""`d2v plan`: per-GPU and per-host memory and the expected step time of a run, before renting it.

Model states are counted per parameter from the real model built on the meta device (so ZeRO-3's
per-parameter padding to a multiple of the world size is exact), for AdamW:
  bf16 training: params 2 B, grads 2 B, fp32 grads 4 B, fp32 master 4 B, Adam moments 8 B
  fp32 training: params 4 B, grads 4 B, fp32 master 4 B (ZeRO-1/2/3 keep a copy of the partition;
                 without ZeRO the optimizer steps the params), Adam moments 8 B
ZeRO-1 partitions the fp32 grads/master/moments, ZeRO-2 also the 16-bit grads, ZeRO-3 also the
params (and adds the largest layer gathered at once); offload_optimizer moves the partitioned fp32
states to host memory. DeepSpeed's own estimators are printed beside for comparison.
Teacher: replicated = compute copy + fp32 accumulators on every GPU; sharded (+ offload) = 1/N
compute slice + 1/N fp32 slice per rank in pinned host memory, a few blocks live on the GPU.
Activations (bf16, Megatron-LM's per-layer count with flash/SDPA attention: 34 * D bytes per token;
without flash add 5 * heads * n): student blocks on M x (T_keep + extra) tokens per sample, the conv
decoder on M x T positions, targets and loss in fp32; with activation checkpointing each block keeps
only its input (2 * D bytes per token) plus one block's activations during recomputation.
"""
from __future__ import annotations

import math
import os
import time

import torch

from .. import dist as dist_mod
from ..config import with_vocab
from ..d2v import Data2Vec
from ..data import synthetic_batch
from ..dist import print0
from ..dsconfig import offloads_optimizer, zero_stage
from ..engine import build_engine
from ..flops import step_flops_per_sample
from ..masking import check_counts
from ..models import ENCODERS, token_grid
from ..teacher import teacher_copy
from ..train import train_step

GB = 1024 ** 3


def _meta_model(cfg):
    m = with_vocab(cfg).model
    with torch.device("meta"):
        model = Data2Vec(m, cfg.mask.mask_noise_std)
        teacher = teacher_copy(model.encoder)
    return model, teacher


def model_states(student_numels: list[int], teacher_numels: list[int], world: int, zero: int, bf16: bool,
                 offload_optimizer: bool, teacher: str) -> dict:
    """Per-rank bytes of each model state (device and host)."""
    part = sum(math.ceil(n / world) for n in student_numels)       # this rank's padded partition
    full = sum(student_numels)
    lp = 2 if bf16 else 4
    shard = lambda stage: part if zero >= stage else full                # noqa: E731
    dev = {"student params": lp * shard(3)}
    states = {}
    if bf16:
        dev["16-bit grads"] = 2 * shard(2)
    states["fp32 grads"] = 4 * shard(1)          # as reduced at the step (ZeRO-1 holds them full during backward)
    if bf16 or zero >= 1:        # fp32 without ZeRO: the optimizer steps the params themselves
        states["fp32 master"] = 4 * shard(1)
    states["Adam moments"] = 8 * shard(1)
    host = {}
    for k, v in states.items():
        (host if offload_optimizer and k != "16-bit grads" else dev)[k] = v
    t_part = sum(math.ceil(n / world) for n in teacher_numels)
    t_full = sum(teacher_numels)
    if teacher == "sharded":
        host["teacher compute slice"] = lp * t_part
        if bf16:
            host["teacher fp32 slice"] = 4 * t_part
    else:
        dev["teacher"] = lp * t_full
        if bf16:
            dev["teacher fp32 accumulators"] = 4 * t_full
    return {"device": dev, "host": host}


def activation_bytes(cfg, micro: int, checkpointing: bool, flash: bool = True) -> dict:
    m, M = cfg.model, cfg.mask.clone_batch
    D, L, H = m.embed_dim, m.prenet_depth + m.depth, m.num_heads
    T, E = math.prod(token_grid(cfg)), ENCODERS[m.modality].num_extra_tokens
    keep = check_counts(T, cfg.mask.mask_prob, cfg.mask.inverse_mask or cfg.mask.mask_length <= 1)
    n = keep + E
    tokens = micro * M * n
    per_token_layer = 34 * D + (0 if flash else 5 * H * n)
    if checkpointing:
        student = L * 2 * D * tokens + per_token_layer * tokens
    else:
        student = L * per_token_layer * tokens
    dd = m.decoder.decoder_dim
    decoder = micro * M * T * (2 * D + m.decoder.decoder_layers * 6 * dd + 2 * dd + 2 * D)
    masked = micro * M * (T - keep)
    loss = micro * T * D * 4 + 3 * masked * D * 4
    teacher = micro * (T + E) * D * (16 + 2 * m.average_top_k_layers)   # one live block + kept layer results
    return {"student blocks": student, "decoder": decoder, "targets + loss (fp32)": loss,
            "teacher forward (transient)": teacher}


# links the teacher's bytes cross (GB/s per GPU); defaults near the H100 box of the README's figures
LINKS = {"pcie": 45.0, "host": 20.0, "gpu": 1500.0, "gather": 150.0}


def teacher_traffic(t_numel: int, world: int, gas: int, bf16: bool, placement: str, zero: int,
                    master_on_host: bool) -> dict[str, float]:
    """Per-rank bytes per optimizer step the teacher and its EMA move, by link:
    pcie (host <-> GPU), host (host memory traffic of a host blend), gpu (device memory traffic of a
    device blend), gather (GPU <-> GPU all-gathers). The teacher's forward runs every micro-step."""
    lp, part = (2 if bf16 else 4), t_numel / world
    blend = 8 + 12 + (6 if bf16 else 0)          # t *= decay (r+w t), t += w s (r t, r s, w t), low = t (r t, w low)
    out = {"pcie": 0.0, "host": 0.0, "gpu": 0.0, "gather": 0.0}
    if placement == "sharded":
        out["pcie"] += gas * part * lp                                       # own slice to the GPU, per forward
        out["gather"] += gas * (t_numel - part) * lp                         # the other ranks' slices
        if master_on_host:
            out["host"] += part * blend                                      # blended in place on the host
        else:
            out["pcie"] += part * (4 + 4 + (2 if bf16 else 0))               # streamed: t in, t out, low out
            out["gpu"] += part * blend
    else:
        if zero >= 3:
            out["gather"] += (t_numel - part) * lp                           # the EMA reads the student by gathers
        out["gpu"] += t_numel * blend
    return out


def link_seconds(traffic: dict[str, float], links: dict[str, float]) -> dict[str, float]:
    return {k: v / (links[k] * 1e9) for k, v in traffic.items()}


def plan(cfg, nodes: int, gpus_per_node: int, zero: int, micro_batch: int, offload_teacher: bool = True,
         offload_optimizer: bool = False, checkpointing: bool = False, mfu: float = 0.4,
         peak_tflops: float = 989.0, bf16: bool = True) -> dict:
    world = nodes * gpus_per_node
    model, teacher = _meta_model(cfg)
    s_numels = [p.numel() for p in model.parameters() if p.requires_grad]
    t_numels = [p.numel() for p in teacher.parameters()]
    largest = max(s_numels)
    teacher_kind = "sharded" if offload_teacher else "replicated"
    ours = model_states(s_numels, t_numels, world, zero, bf16, offload_optimizer, teacher_kind)
    if zero >= 3:
        ours["device"]["gathered working set (largest layer x2)"] = (2 if bf16 else 4) * 2 * largest
    if offload_teacher:
        live = int(6e7)                                   # teacher ds config: stage3_max_live_parameters
        ours["device"]["teacher live blocks"] = (2 if bf16 else 4) * min(live, sum(t_numels))
    acts = activation_bytes(cfg, micro_batch, checkpointing)
    acts_nockpt = activation_bytes(cfg, micro_batch, False)
    gas = max(1, cfg.data.global_batch // (micro_batch * world)) if cfg.data.global_batch else 1
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
    traffic = {kind: teacher_traffic(sum(t_numels), world, gas, bf16, kind, zero, offload_optimizer)
               for kind in ("replicated", "sharded")}
    return {"traffic": traffic, "links": dict(LINKS),
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
    ours = block(f"d2v_scale (teacher {'sharded, CPU-offloaded' if args['offload_teacher'] else 'replicated'}"
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
    print(f"  teacher + EMA traffic per optimizer step and rank (GB; ms at pcie {p['links']['pcie']:.0f}, host "
          f"{p['links']['host']:.0f}, gpu {p['links']['gpu']:.0f}, gather {p['links']['gather']:.0f} GB/s):")
    for kind, traffic in p["traffic"].items():
        secs = link_seconds(traffic, p["links"])
        cells = "  ".join(f"{k} {traffic[k] / 1e9:.3f} ({secs[k] * 1e3:.1f} ms)" for k in traffic)
        print(f"    {kind:<10} {cells}  -> +{sum(secs.values()) * 1e3:.1f} ms over compute if nothing overlaps")
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
        t_bytes, t_ptrs = nbytes([p.ds_tensor for p in teacher.params])
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
    kind = "sharded" if teacher.sharded else "replicated"
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
    kind = "sharded" if teacher.sharded else "replicated"
    t_numel = sum(math.prod(shape) for shape in getattr(teacher, "shapes", {}).values()) or \
        sum(p.numel() for p in teacher.module.parameters())
    traffic = teacher_traffic(t_numel, dist.world, 0, bf16, kind, zero, master_on_host=dist.device.type != "cuda"
                              or offload_opt)                            # gas 0: the EMA alone
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("LOCAL_SIZE", "1")))
    bw = host_bandwidth() / max(1, local) if dist.device.type != "cuda" else None   # the ranks share it
    planned = sum(traffic.values()) / bw if bw else sum(link_seconds(traffic, LINKS).values())
    print0(f"  EMA update ({kind} teacher): measured {measured * 1e3:.1f} ms, planned {planned * 1e3:.1f} ms "
           f"({sum(traffic.values()) / 1e6:.1f} MB of traffic" + (f" at {bw / 1e9:.1f} GB/s per rank: host bandwidth measured now / {local} ranks)"
                                                                  if bw else ")"))
    return {"measured_s": measured, "planned_s": planned, "bytes": sum(traffic.values())}
