"""Issue #5's speed and memory benchmark: seconds and peak memory per distillation iteration, expert generation.

    .venv/bin/python benchmarks/speed.py                                # full grid: N 99..999 × 64/128/224 px, fp32
    .venv/bin/python benchmarks/speed.py --quick                        # smoke run: N 10,20, 64 px, 1 iteration
    .venv/bin/python benchmarks/speed.py --num_pairs 99 --image_sizes 64 --variants floor,repblend,repblend_per_step
    .venv/bin/python benchmarks/speed.py --device cuda --dtypes fp32,bf16 --image_encoder nfnet_l0 \
        --pretrained false --skip_experts --tag cuda_nfnet_l0                 # a GPU run; no dataset needed
    .venv/bin/python benchmarks/speed.py --report_only                  # re-render the report from the JSON

What one distillation iteration costs, per variant (DESIGN.md, "Where the speed comes from"):

- ``repblend`` (a): RepBlend as implemented: symmetric matching, the frozen encoder runs once per
  iteration on the distinct synthetic images the iteration touches, its pixel backward chunked by
  ``--encoder_chunk_size`` (memory flat in N, one more no-grad forward per image);
- ``repblend_unchunked``: the same with ``encoder_chunk_size=0`` (one forward, one backward per image);
- ``repblend_auto``: the library's default ``encoder_chunk_size=-1``: ``EncoderPass.plan`` picks one of the
  three from the touched images, the device and the free memory;
- ``repblend_chunks_kept``: (a) with ``encoder_recompute=False`` (chunked calls, every chunk's graph kept: one
  forward and one backward per image at the chunk's batch size);
- ``repblend_unfolded``: (a) with ``fold_batchnorm=False`` (the encoder's BatchNorms run as such);
- ``repblend_per_step`` (b): ``encoder_per_step=True``, the authors' design: the encoder runs inside every
  inner step and again when TESLA recomputes the step, its BatchNorms not folded (as in their code);
- ``lors`` (c): ``method="lors"``: asymmetric matching, the image encoder is unrolled in the inner loop; as
  released, the student is the encoder + the text head (no image head, so the text head outputs the encoder's
  width whatever ``--embed_dim`` says);
- ``lors_aten``: (c) with ATen's own double backward through the encoder's grouped convolutions, which loops
  over the groups (the library routes them through ``repblend_hf.grouped_conv``): what that routing saves;
- ``floor``: the least work any implementation must do: one encoder forward and one input-gradient
  backward of the touched images, plus the inner loop on features alone, with the same encoder function as
  (a) (BatchNorms folded), graphs kept, measured at each encoder batch size of ``floor_batch_sizes`` (all
  touched images in one call, the automatic mode's chunk and ``--encoder_chunk_size``); the fastest is the
  floor, so it is a lower bound whatever batch a mode uses. It is the library's own
  ``repblend_hf.distillation.outer_iteration`` called without the Trainer shell (no optimiser step, no
  logging), its encoder pass timed apart (``encoder_s_per_iter``, the rest ``heads_s_per_iter``);
  ``timed_iteration`` is what it times, and a test checks that it gives the trainer's gradients.

``--profile`` runs the timed iterations under ``torch.profiler`` and adds the seconds per phase (the
trainer's ``record_function`` labels) and the ops with the most self time to the report.

Each (variant, N, image size, dtype) runs ``DistillationTrainer.train()`` for ``--warmup + --timed``
iterations in a fresh subprocess (so peak memory does not leak between configurations) and reports the
median time of the timed iterations (a ``TrainerCallback`` at ``on_step_begin`` / ``on_step_end``) and the
peak memory increase over the state before training (CPU: ``VmHWM`` of ``/proc/self/status``, reset through
``/proc/self/clear_refs``; CUDA: ``torch.cuda.max_memory_allocated``). Timings do not depend on the data,
so the synthetic set is random tensors and the expert trajectories are random-but-valid vectors of the
right branch sizes written with ``TrajectoryWriter``: no dataset is read and nothing is encoded. The outer
learning rates are tiny so the set stays at its start and every timed iteration does the same work.

CPU timings need an otherwise idle machine: torch's OpenMP threads slow down many-fold when other
processes take their cores (a head step measured 0.66 s with 2 threads vs 0.015 s with 1 on a busy 2-core
machine). Each record keeps ``other_processes_cores`` (the cores others used meanwhile) and the report
flags oversubscribed configurations; on a shared machine pass ``--threads 1``. On 2 CPU cores LoRS at
128/224 px takes minutes to hours per iteration: give it its own command (``--variants lors``) or a GPU.

The expert comparison trains one symmetric expert for one epoch on the cached features of
``--dataset`` at ``--expert_image_size`` (``train_experts``; a cache hit for the embedded default at
64 px, otherwise the whole train split is encoded first) and times a few batches of the same head
training where each batch's images are first decoded, transformed and run through the frozen image encoder and
its captions through the frozen text encoder, as the authors' ``buffer.py`` does (``CLIPModel_full.forward``;
``--no-expert_encode_captions`` takes the captions from the cache), extrapolated to one epoch. An epoch is one
pass over the (image, caption) pairs on both sides, as ``train_experts`` and the authors' loaders define it.
The end-to-end time of the default run is read from ``--timings``
(``benchmarks/results/default_run/timings.json``), not measured here.

Results accumulate in ``benchmarks/results/speed[_TAG].json`` (finished configurations are skipped on a
rerun unless ``--force``); ``speed[_TAG].md`` and the plots ``speed_vs_n[_TAG].png`` and
``memory_vs_n[_TAG].png`` show the configurations of the current command.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

VARIANTS: dict[str, dict[str, object]] = {
    # DistillationArguments overrides of each variant; "floor" is not a trainer run (see _measure_floor).
    "floor": {"method": "repblend", "encoder_recompute": False},  # the chunk graphs kept: one forward per image
    "repblend": {"method": "repblend"},  # encoder_chunk_size comes from --encoder_chunk_size
    "repblend_unchunked": {"method": "repblend", "encoder_chunk_size": 0},
    "repblend_auto": {"method": "repblend", "encoder_chunk_size": -1},  # the library default: EncoderPass.plan
    "repblend_chunks_kept": {"method": "repblend", "encoder_recompute": False},
    "repblend_unfolded": {"method": "repblend", "fold_batchnorm": False},
    "repblend_per_step": {"method": "repblend", "encoder_per_step": True, "fold_batchnorm": False},
    "lors": {"method": "lors"},
    # LoRS with ATen's own double backward for the encoder's grouped convolutions (the library routes them
    # through repblend_hf.grouped_conv, whose double backward has no per-group loop): what that routing saves.
    "lors_aten": {"method": "lors"},
}
LORS_VARIANTS = ("lors", "lors_aten")
LABELS = {"floor": "floor", "repblend": "(a) RepBlend", "repblend_unchunked": "RepBlend, unchunked",
          "repblend_auto": "RepBlend, auto (the default)",
          "repblend_unfolded": "RepBlend, BatchNorms not folded",
          "repblend_chunks_kept": "RepBlend, chunk graphs kept",
          "repblend_per_step": "(b) RepBlend, encoder per step", "lors": "(c) LoRS",
          "lors_aten": "LoRS, ATen's grouped double backward"}
TARGETS = {"per_step_over_repblend": 2.4, "repblend_over_floor": 1.2, "experts_ratio": 50.0}
MB = 2**20
# A CPU measurement is flagged unreliable when its torch threads plus the cores other processes used meanwhile
# exceed the machine's cores by more than this: oversubscribed OpenMP threads slow torch down many-fold.
OVERSUBSCRIPTION_SLACK = 0.25


# ----- one configuration (runs in a worker process) ---------------------------------------------------------------


class PeakMemory:
    """Peak memory increase over the state at :meth:`start`: CPU resident set (VmHWM) or CUDA allocations."""

    def __init__(self, device: str):
        self.device = device

    @staticmethod
    def _status_kb(name: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"/proc/self/status has no {name}")

    def start(self) -> None:
        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return
        try:  # "5" resets the peak resident set size to the current one (Linux >= 4.0)
            Path("/proc/self/clear_refs").write_text("5")
            self.reset = True
        except OSError:
            self.reset = False  # then the peak may be one of the set-up in this process
        self.baseline = self._status_kb("VmRSS") * 1024

    def stop(self) -> dict[str, object]:
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            peak, kind = torch.cuda.max_memory_allocated(), "cuda max_memory_allocated"
        else:
            peak = self._status_kb("VmHWM") * 1024
            kind = "cpu VmHWM" + ("" if self.reset else " (not reset: includes set-up)")
        return {"peak_mem_mb": round(peak / MB, 1), "peak_mem_increase_mb": round((peak - self.baseline) / MB, 1),
                "mem_kind": kind}


def _cpu_times() -> tuple[float, float, float]:
    """(wall clock, CPU seconds of the whole machine, CPU seconds of this process), to see who else was busy."""
    import resource

    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    machine = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = resource.getrusage(resource.RUSAGE_SELF)
    return time.perf_counter(), machine, own.ru_utime + own.ru_stime


def _other_processes_cores(before: tuple, after: tuple) -> float:
    """Cores that other processes (and the hypervisor's steal) used on average between two :func:`_cpu_times`."""
    wall = after[0] - before[0]
    return max(0.0, ((after[1] - before[1]) - (after[2] - before[2])) / wall) if wall > 0 else 0.0


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


def _step_timer(device: str, counters: dict, on_step=None):
    """A TrainerCallback timing each training step and the encoder passes in it; memory from train begin to end.

    ``on_step`` (the profiler's ``step``) is called after each step's time is taken.
    """
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.seconds, self.passes, self.memory = [], [], PeakMemory(device)

        def _snapshot(self) -> dict[str, int]:
            return {f"{name}_{k}": v for name, c in counters.items() for k, v in c.items()}

        def on_train_begin(self, args, state, control, **kwargs):
            self.memory.start()

        def on_step_begin(self, args, state, control, **kwargs):
            _sync(device)
            self.before = self._snapshot()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            _sync(device)
            self.seconds.append(time.perf_counter() - self.t0)
            after = self._snapshot()
            self.passes.append({k: after[k] - self.before[k] for k in after})
            if on_step is not None:
                on_step()

        def on_train_end(self, args, state, control, **kwargs):
            self.peak = self.memory.stop()

    return StepTimer()


def _synthetic_set(spec: dict, image_dim: int, similarity: str):
    """A SyntheticSet of random tensors (values do not change the cost of an iteration)."""
    import torch

    from repblend_hf import RepBlendConfig, SyntheticSet

    n, size = spec["num_pairs"], spec["image_size"]
    # The released LoRS student: encoder + text head of the encoder's width.
    asymmetric = spec["variant"] in LORS_VARIANTS
    config = RepBlendConfig(image_encoder=spec["image_encoder"], image_size=size, image_dim=image_dim,
                            text_dim=spec["text_dim"], embed_dim=image_dim if asymmetric else spec["embed_dim"],
                            num_pairs=n, similarity=similarity, sim_rank=min(spec["sim_rank"], n), method="repblend",
                            matching="asymmetric" if asymmetric else "symmetric")
    g = torch.Generator().manual_seed(spec["seed"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["seed"])
        return SyntheticSet(config, torch.randn(n, 3, size, size, generator=g),
                            torch.randn(n, spec["text_dim"], generator=g))


def _distillation_args(spec: dict, output_dir: str):
    from repblend_hf import DistillationArguments

    overrides = {"encoder_chunk_size": spec["encoder_chunk_size"], **VARIANTS[spec["variant"]]}
    # Outer lrs do not change the cost of an iteration. Tiny ones keep the set at its random start, so every
    # timed iteration does the same work: against random trajectories the default lrs drive the set to
    # non-finite values within a few iterations, and the trainer then skips the optimiser update.
    # One expert segment per iteration, as in the authors' design, so the variants compare like with like
    # (the library default matches 2 against one encoder pass: benchmarks/segments.py).
    return DistillationArguments(
        output_dir=output_dir, max_steps=spec["warmup"] + spec["timed"], syn_steps=spec["syn_steps"],
        mini_batch_size=spec["mini_batch_size"], segments_per_iteration=1, lr_img=1e-8, lr_txt=1e-8, lr_sim=1e-8,
        lr_lr=1e-8, seed=spec["seed"],
        bf16=spec["dtype"] == "bf16", use_cpu=spec["device"] == "cpu", save_strategy="no", eval_strategy="no",
        report_to="none", disable_tqdm=True, logging_steps=1, log_level="warning", **overrides)


def measure(spec: dict) -> dict:
    """Time ``warmup + timed`` iterations of one configuration and measure its peak memory (in this process)."""
    if spec["variant"] == "lors_aten":
        with aten_grouped_double_backward():
            return _measure(spec)
    return _measure(spec)


@contextlib.contextmanager
def aten_grouped_double_backward():
    """The student's encoder convolutions without the library's grouped_conv routing (variant ``lors_aten``; also
    ``grouped_conv.py``'s ``aten`` path)."""
    import repblend_hf.inner_loop as inner_loop

    routed = inner_loop.grouped_conv_double_backward
    inner_loop.grouped_conv_double_backward = contextlib.nullcontext
    try:
        yield
    finally:
        inner_loop.grouped_conv_double_backward = routed


def _measure(spec: dict) -> dict:
    import torch

    from repblend_hf.encoders import EncoderPassCounter, load_image_encoder
    from repblend_hf.pipeline import configure_cpu_threads
    from repblend_hf.trajectories import ExpertTrajectories

    cpu_before = _cpu_times()
    configure_cpu_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    encoder = load_image_encoder(spec["image_encoder"], image_size=spec["image_size"], pretrained=spec["pretrained"])
    with tempfile.TemporaryDirectory(prefix="repblend-speed-") as tmp:
        args = _distillation_args(spec, tmp)
        synthetic = _synthetic_set(spec, encoder.feature_dim, args.similarity)
        trajectories = ExpertTrajectories.load(spec["trajectory_dir"])
        # LoRS unrolls encoder.model; every other variant calls the encoder itself (its folded copy by default). The
        # library's counter, attached from outside: the same hook as the trainer's own encoder_passes.
        counter = EncoderPassCounter(encoder.model if spec["variant"] in LORS_VARIANTS else encoder)
        with _profiler(spec) as profiler:
            step = profiler.step if profiler is not None else None
            if spec["variant"] == "floor":
                out = _measure_floor(spec, args, synthetic, trajectories, encoder, counter, step)
            else:
                out = _measure_trainer(spec, args, synthetic, trajectories, encoder, counter, step)
        counter.remove()
        if profiler is not None:
            out["profile"] = profile_summary(profiler.key_averages(), spec["timed"], spec["device"])
    other_cores = _other_processes_cores(cpu_before, _cpu_times())
    timed = out.pop("seconds")[spec["warmup"]:]
    passes = out.pop("passes")[spec["warmup"]:]
    return {**{k: spec[k] for k in ("variant", "num_pairs", "image_size", "dtype", "device", "image_encoder")},
            "s_per_iter": statistics.median(timed), "s_per_iter_timed": timed,
            "encoder_passes_per_iter": {k: statistics.median(p[k] for p in passes) for k in passes[0]},
            "threads": torch.get_num_threads(), "other_processes_cores": round(other_cores, 2), **out}


def _measure_trainer(spec, args, synthetic, trajectories, encoder, counter, on_step=None) -> dict:
    from transformers import PrinterCallback

    from repblend_hf.trainers import DistillationTrainer

    trainer = DistillationTrainer(synthetic, args, trajectories, encoder)
    trainer.remove_callback(PrinterCallback)
    counters = {"hooked": counter.counts, "trainer": trainer.encoder_passes}  # the trainer counts its own too
    timer = _step_timer(spec["device"], counters, on_step)
    trainer.add_callback(timer)
    trainer.train()
    logged = [h for h in trainer.state.log_history if "touched_images" in h]
    return {"seconds": timer.seconds, "passes": timer.passes, **timer.peak,
            "touched_images": statistics.mean(h["touched_images"] for h in logged),
            "nonfinite_iterations": int(sum(h["nonfinite_skipped"] for h in logged))}


class _TimedEncoderPass:
    """The library's :class:`~repblend_hf.encoders.EncoderPass` with its forward and backward timed (the floor's
    encoder share); everything else is the wrapped pass itself."""

    def __init__(self, encoder_pass, device: str):
        self.encoder_pass, self.device, self.seconds = encoder_pass, device, 0.0

    def __getattr__(self, name):
        return getattr(self.encoder_pass, name)

    def _timed(self, method, *args):
        _sync(self.device)
        t0 = time.perf_counter()
        out = method(*args)
        _sync(self.device)
        self.seconds += time.perf_counter() - t0
        return out

    def forward(self, images):
        return self._timed(self.encoder_pass.forward, images)

    def backward(self, state, grad):
        return self._timed(self.encoder_pass.backward, state, grad)


def timed_iteration(synthetic, heads, trajectories, encoder_pass, args, step: int, device: str = "cpu"):
    """One call of the library's ``outer_iteration`` at ``step``, timed: ``(result, seconds, encoder seconds)``.

    The same function, generator and settings as the DistillationTrainer's step ``step`` (process 0), so it returns
    the trainer's gradients (tests/test_speed_benchmark.py checks it); the Trainer shell around it (the surrogate
    backward, the optimiser step, logging) is what the floor leaves out.
    """
    from repblend_hf.distillation import inner_temperature, iteration_generator, outer_iteration

    timed = _TimedEncoderPass(encoder_pass, device)
    _sync(device)
    t0 = time.perf_counter()
    result = outer_iteration(synthetic, heads, trajectories, timed, args, iteration_generator(args.seed, step),
                             temperature=inner_temperature(synthetic.config, args))
    _sync(device)
    return result, time.perf_counter() - t0, timed.seconds


def floor_batch_sizes(chunk_size: int) -> list[int]:
    """The encoder batch sizes the floor is measured at: one call on every touched image (0), the library's
    automatic chunk and the run's ``--encoder_chunk_size``. Graphs are kept at each, so every candidate does one
    forward and one backward per image; only the batch per encoder call differs, and the fastest is the floor."""
    from repblend_hf.encoder_pass import AUTO_CHUNK

    return sorted({0, AUTO_CHUNK} | ({chunk_size} if chunk_size > 0 else set()))


def _measure_floor(spec, args, synthetic, trajectories, encoder, counter, on_step=None) -> dict:
    """The floor: :func:`timed_iteration` on the set, its encoder pass (forward + input-gradient backward of the
    touched images) and the rest (the inner loop on features) timed apart, at each of :func:`floor_batch_sizes`;
    the batch size with the lowest median is the floor (a lower bound must not depend on a batch size chosen for
    memory). Every candidate's median is kept in ``floor_candidates_s``."""
    import copy

    from repblend_hf.distillation import encoder_pass_for, student_heads

    device = spec["device"]
    syn = synthetic.to(device)
    encoder.to(device)
    heads = student_heads(syn.config).to(device)
    timed = slice(spec["warmup"], None)
    runs = {}
    for batch in floor_batch_sizes(spec["encoder_chunk_size"]):
        run_args = copy.copy(args)  # TrainingArguments: no dataclasses.replace (it would rerun __post_init__)
        run_args.encoder_chunk_size, run_args.encoder_recompute = batch, False
        encoder_pass = encoder_pass_for(encoder, syn.config, run_args)  # folds the BatchNorms as (a) does
        memory = PeakMemory(device)
        memory.start()
        seconds, encoder_s, heads_s, passes, touched_counts = [], [], [], [], []
        for step in range(spec["warmup"] + spec["timed"]):
            before = dict(counter.counts)
            result, total, encoding = timed_iteration(syn, heads, trajectories, encoder_pass, run_args, step, device)
            seconds.append(total)
            encoder_s.append(encoding)
            heads_s.append(total - encoding)
            passes.append({f"hooked_{k}": counter.counts[k] - before[k] for k in before})
            touched_counts.append(len(result.plans[0].touched))
            if on_step is not None:
                on_step()
        encoder_pass._counter.remove()  # each pass hooks the encoder: keep one hook per candidate, not a growing pile
        runs[batch] = {"seconds": seconds, "passes": passes, **memory.stop(),
                       "encoder_s_per_iter": statistics.median(encoder_s[timed]),
                       "heads_s_per_iter": statistics.median(heads_s[timed]),
                       "touched_images": statistics.mean(touched_counts)}
    fastest = min(runs, key=lambda b: statistics.median(runs[b]["seconds"][timed]))
    return {**runs[fastest], "floor_batch_size": fastest,
            "floor_candidates_s": {str(b): statistics.median(r["seconds"][timed]) for b, r in runs.items()}}


# ----- the profile (--profile) ---------------------------------------------------------------------------------------

PHASES = ("encoder_forward", "inner_loop", "pixel_backward")  # the trainer's record_function labels, "repblend:..."


@contextlib.contextmanager
def _profiler(spec: dict):
    """``torch.profiler`` over the timed iterations when ``spec["profile"]``, else ``None``."""
    if not spec.get("profile"):
        yield None
        return
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if spec["device"] == "cuda" else [])
    when = schedule(wait=0, warmup=spec["warmup"], active=spec["timed"], repeat=1)
    with profile(activities=activities, schedule=when) as p:
        yield p


def profile_summary(events, iterations: int, device: str, top: int = 12) -> dict:
    """Seconds per iteration of each phase (the ``repblend:*`` labels, the optimiser step) and the top ops.

    ``events`` is ``profiler.key_averages()``. On CUDA the device time is used, on CPU the CPU time; the
    top ops are ranked by their self time (time in the op, not in the ops it calls).
    """
    total, own = (("device_time_total", "self_device_time_total") if device == "cuda"
                  else ("cpu_time_total", "self_cpu_time_total"))
    per_iter = lambda us: us / 1e6 / iterations  # noqa: E731
    # A record_function range is two events on CUDA, keyed alike: the host's (device_type CPU: its CPU time) and
    # the GPU's user annotation (its span on the device's timeline). Keep them apart, or one hides the other.
    labelled = [e for e in events if e.key.startswith("repblend:")]
    on_gpu = lambda e: "CUDA" in str(getattr(e, "device_type", ""))  # noqa: E731
    spans = [e for e in labelled if on_gpu(e)] if device == "cuda" else []
    phases = {e.key.split(":", 1)[1]: per_iter(getattr(e, total))
              for e in (spans or [e for e in labelled if not on_gpu(e)])}
    steps = [e for e in events if e.key.startswith("ProfilerStep")]
    optimiser = [e for e in events if e.key.startswith("Optimizer.step")]
    if optimiser:
        phases["optimizer_step"] = per_iter(sum(getattr(e, total) for e in optimiser))
    if steps and device != "cuda":
        phases["iteration"] = per_iter(sum(e.cpu_time_total for e in steps))
    # On CUDA, also the host's time in each phase: a phase whose device span is far above its kernels' own time,
    # with the host busy throughout, is bound by launching kernels, not by the kernels themselves.
    host = ({e.key.split(":", 1)[1]: per_iter(e.cpu_time_total) for e in labelled if not on_gpu(e)}
            if device == "cuda" else {})
    launches = (sum(e.count for e in events if e.key in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC"))
                / iterations if device == "cuda" else None)
    kernels = (per_iter(sum(e.self_device_time_total for e in events
                            if on_gpu(e) and not e.key.startswith("repblend:"))) if device == "cuda" else None)
    ops = sorted((e for e in events if not e.key.startswith(("repblend:", "ProfilerStep", "Optimizer."))),
                 key=lambda e: getattr(e, own), reverse=True)[:top]
    return {"time": total, "phases_s_per_iter": phases, "host_phases_s_per_iter": host,
            "kernel_launches_per_iter": launches, "device_self_s_per_iter": kernels,
            "top_ops": [{"op": e.key, "self_s_per_iter": per_iter(getattr(e, own)),
                         "calls_per_iter": e.count / iterations} for e in ops]}


# ----- expert trajectories: cached features vs encoding every batch ------------------------------------------------


class _Laps:
    """Seconds between successive :meth:`lap` calls, the device synchronised first."""

    def __init__(self, device: str):
        self.device, self.stages, self.t = device, [], time.perf_counter()

    def lap(self, name: str) -> None:
        _sync(self.device)
        now = time.perf_counter()
        self.stages.append((name, now - self.t))
        self.t = now


def measure_experts(args, device: str) -> dict:
    """One epoch of one symmetric expert from cached features vs the same epoch encoding each batch's images."""
    import torch

    from repblend_hf.losses import info_nce
    from repblend_hf.modeling import RetrievalHeads, similarity_logits
    from repblend_hf.pipeline import DataArguments, prepare_features
    from repblend_hf.trainers import train_experts
    from repblend_hf.training_args import ExpertTrainingArguments

    prepared = prepare_features(DataArguments(
        dataset=args.dataset, image_encoder=args.image_encoder, pretrained_image_encoder=args.pretrained,
        text_encoder=args.text_encoder, image_size=args.expert_image_size, cpu_threads=args.threads))
    train = prepared.features["train"]
    cpu_before = _cpu_times()
    with tempfile.TemporaryDirectory(prefix="repblend-speed-experts-") as tmp:
        expert_args = ExpertTrainingArguments(
            output_dir=f"{tmp}/run", num_experts=1, num_train_epochs=args.expert_cached_epochs,
            embed_dim=args.embed_dim, use_cpu=device == "cpu", disable_tqdm=True, report_to="none",
            logging_steps=10**6, log_level="warning")
        _sync(device)
        t0 = time.perf_counter()
        train_experts(train, expert_args, f"{tmp}/trajectories")
        _sync(device)
        cached_epoch_s = (time.perf_counter() - t0) / args.expert_cached_epochs
    batch = expert_args.per_device_train_batch_size
    # An expert epoch is one pass over the (image, caption) pairs, as in train_experts and the authors' loaders.
    steps_per_epoch = math.ceil(train.num_captions / batch)

    encoder = prepared.image_encoder.to(device)
    heads = RetrievalHeads(train.image_features.shape[1], train.caption_features.shape[1], args.embed_dim).to(device)
    optimizer = torch.optim.SGD(heads.parameters(), lr=expert_args.learning_rate)
    rows = prepared.dataset["train"].select_columns(["image", "captions"])
    text_encoder = prepared.text_encoder.to(device)
    offsets = train.caption_offsets()
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(train.num_captions, generator=g)
    batches = min(args.expert_batches + 1, steps_per_epoch)  # the first one is a warm-up
    parts: dict[str, list[float]] = {}
    for k in range(batches):
        caption_idx = order[k * batch:(k + 1) * batch]  # a batch of (image, caption) pairs
        idx = train.caption_to_image[caption_idx]
        chosen = caption_idx - offsets[idx]  # the caption's position among its image's captions
        laps = _Laps(device)
        batch_rows = rows[idx.tolist()]
        pixels = torch.stack([encoder.train_transform(im.convert("RGB")) for im in batch_rows["image"]]).to(device)
        laps.lap("load_transform_s")
        with torch.no_grad():
            feats = encoder(pixels).float()
        laps.lap("encode_s")
        if args.expert_encode_captions:
            texts = text_encoder.encode_texts([caps[c] for caps, c in zip(batch_rows["captions"], chosen.tolist())])
            laps.lap("encode_captions_s")
        else:
            texts = train.caption_features[caption_idx]
        logits = similarity_logits(*heads(feats, texts.to(device)), expert_args.temperature)
        optimizer.zero_grad()
        info_nce(logits).backward()
        optimizer.step()
        laps.lap("heads_s")
        if k > 0 or batches == 1:
            for name, seconds in laps.stages:
                parts.setdefault(name, []).append(seconds)
    per_batch = {name: statistics.median(v) for name, v in parts.items()}
    encoding_epoch_s = sum(per_batch.values()) * steps_per_epoch
    return {"dataset": args.dataset, "image_encoder": args.image_encoder, "image_size": args.expert_image_size,
            "device": device, "train_images": train.num_images, "train_captions": train.num_captions,
            "epoch": "per_caption", "batch_size": batch,
            "steps_per_epoch": steps_per_epoch, "cached_epoch_s": cached_epoch_s,
            "cached_epochs_timed": args.expert_cached_epochs, "encoding_batches_timed": len(parts["encode_s"]),
            "captions_encoded": args.expert_encode_captions, "encoding_per_batch_s": per_batch,
            "encoding_epoch_s": encoding_epoch_s,
            "ratio": encoding_epoch_s / cached_epoch_s,
            # The same hand-written loop with and without the encoding: no Trainer or data-loader overhead.
            "ratio_same_loop": encoding_epoch_s / (per_batch["heads_s"] * steps_per_epoch),
            "threads": torch.get_num_threads(),
            "other_processes_cores": round(_other_processes_cores(cpu_before, _cpu_times()), 2)}


# ----- the grid ----------------------------------------------------------------------------------------------------


def write_random_trajectories(directory: Path, image_encoder, text_dim: int, embed_dim: int, num_epochs: int,
                              asymmetric: bool) -> Path:
    """One expert of random-but-valid snapshots: the branch sizes the trainer checks, values near a fresh init."""
    import torch

    from repblend_hf.modeling import RetrievalHeads, branch_sizes, flatten_parameters
    from repblend_hf.trajectories import ExpertTrajectories
    from repblend_hf.trajectory_writer import TrajectoryWriter

    if ExpertTrajectories.completed_experts(directory):
        return directory
    torch.manual_seed(0)
    if asymmetric:  # the released LoRS experts: the encoder and a text head of its width, no image head
        embed_dim = image_encoder.feature_dim
    heads = RetrievalHeads(image_encoder.feature_dim, text_dim, embed_dim, image_head=not asymmetric)
    trained = image_encoder.model if asymmetric else None
    start = {"image": flatten_parameters(heads.image_head), "text": flatten_parameters(heads.text_head)}
    if trained is not None:
        start["image"] = flatten_parameters(trained)
    writer = TrajectoryWriter(directory, {
        "num_epochs": num_epochs, "branch_sizes": branch_sizes(heads, trained), "num_experts": 1,
        "matching": "asymmetric" if asymmetric else "symmetric", "image_encoder": image_encoder.name,
        "image_dim": image_encoder.feature_dim, "text_dim": text_dim, "embed_dim": embed_dim,
        "note": "random snapshots for benchmarks/speed.py: valid shapes, values irrelevant to speed"})
    step = {b: 1e-3 * torch.randn_like(v) for b, v in start.items()}
    for epoch in range(num_epochs + 1):
        writer.record(0, epoch, {b: start[b] + epoch * step[b] for b in start})
    return directory


def config_key(spec: dict) -> str:
    """What identifies a measurement: everything that changes its cost."""
    encoder = spec["image_encoder"] + ("" if spec["pretrained"] else "(random)")
    return (f"{spec['device']}|{encoder}|{spec['dtype']}|{spec['image_size']}px|N={spec['num_pairs']}|"
            # the floor at its fastest encoder batch, not the earlier floor at (a)'s chunk size
            f"{spec['variant']}{'(fastest batch)' if spec['variant'] == 'floor' else ''}|"
            f"steps={spec['syn_steps']}x{spec['mini_batch_size']}|d={spec['embed_dim']}|"
            f"chunk={spec['encoder_chunk_size']}|threads={spec['threads']}"
            + ("|bn_folded" if folds_batchnorm(spec) else "") + ("|profiled" if spec.get("profile") else "")
            + ("|no_image_head" if spec["variant"] in LORS_VARIANTS else "")  # apart from LoRS with an image head
            + ("|grouped_conv" if spec["variant"] == "lors" else ""))  # apart from LoRS before grouped_conv


def folds_batchnorm(spec: dict) -> bool:
    """Whether the variant's encoder has its BatchNorms folded (keeps measurements made before folding apart)."""
    return spec["variant"] not in LORS_VARIANTS and bool(VARIANTS[spec["variant"]].get("fold_batchnorm", True))


def run_config(spec: dict, in_process: bool, timeout: int) -> dict:
    """:func:`measure` in a fresh interpreter (or in this one), returning its record or ``{"error": ...}``."""
    if in_process:
        return measure(spec)
    with tempfile.TemporaryDirectory(prefix="repblend-speed-worker-") as tmp:
        spec_path, result_path = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec_path.write_text(json.dumps(spec))
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(spec_path), str(result_path)]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout} s"}
        if proc.returncode != 0 or not result_path.exists():
            return {"error": f"exit code {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}"}
        return json.loads(result_path.read_text())


def environment(device: str, threads: int | None) -> dict:
    import torch

    info = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "cpu_cores": len(os.sched_getaffinity(0)), "threads": threads or len(os.sched_getaffinity(0))}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        info["cpu"] = names[0] if names else platform.processor()
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


# ----- report ------------------------------------------------------------------------------------------------------


def _fmt(x, spec: str = ".3g", suffix: str = "") -> str:
    return "–" if x is None else f"{x:{spec}}{suffix}"


def _oversubscribed(record: dict, env: dict) -> bool:
    if record.get("device") != "cpu" or "other_processes_cores" not in record:
        return False
    return record["other_processes_cores"] + record["threads"] > env["cpu_cores"] + OVERSUBSCRIPTION_SLACK


def _ratio(a: dict | None, b: dict | None, key: str = "s_per_iter") -> float | None:
    if not a or not b or a.get(key) is None or not b.get(key):
        return None
    return a[key] / b[key]


def write_report(path: Path, command: str, env: dict, settings: dict, grid: dict, runs: dict[tuple, dict],
                 expert_records: list[dict], end_to_end: dict | None) -> str:
    """The Markdown report of the current command's configurations, with the ratios against the targets."""
    variants, rows = grid["variants"], [(d, s, n) for d in grid["dtypes"] for s in grid["image_sizes"]
                                        for n in grid["num_pairs"]]
    get = lambda row, v: runs.get((*row, v))  # noqa: E731
    # (a) in the ratio columns: the library's default (the automatic mode) when measured, else --encoder_chunk_size's
    a_mode = "repblend_auto" if "repblend_auto" in variants else "repblend"
    ratio_b_a = {row: _ratio(get(row, "repblend_per_step"), get(row, a_mode)) for row in rows}
    ratio_a_floor = {row: _ratio(get(row, a_mode), get(row, "floor")) for row in rows}
    device = env["device"] + (f" ({env['gpu']})" if "gpu" in env else f" ({env.get('cpu', '?')})")
    isolation = ("all configurations in one process (--in_process)" if settings["in_process"]
                 else "each configuration in its own process")
    lines = [
        "# Distillation speed and memory (issue #5)", "",
        f"Command: `{command}`", "",
        f"Device: {device}, {env['threads']} torch threads, {env['cpu_cores']} usable cores; torch {env['torch']}. "
        f"Image encoder `{settings['image_encoder']}` "
        f"({'pretrained' if settings['pretrained'] else 'random weights'}), "
        f"text dim {settings['text_dim']}, embed dim {settings['embed_dim']}, syn_steps {settings['syn_steps']}, "
        f"mini_batch_size {settings['mini_batch_size']}, TESLA meta-gradient, encoder_chunk_size "
        f"{settings['encoder_chunk_size']} for (a). Median of {settings['timed']} timed iteration(s) after "
        f"{settings['warmup']} warm-up; "
        f"{isolation}.",
        "",
        "The synthetic set is random tensors and the expert trajectories are random-but-valid snapshots of the "
        "right branch sizes (written with `TrajectoryWriter`): their values do not change the cost of an iteration.",
        "",
        "Variants: (a) `repblend` = RepBlend as implemented (encoder once per iteration on the touched images, "
        "BatchNorms folded into the convolutions, chunked pixel backward); `repblend_unchunked` = the same in one "
        "graph; `repblend_chunks_kept` = (a) keeping every chunk's graph instead of recomputing it; "
        "`repblend_unfolded` = (a) without the BatchNorm folding; (b) `repblend_per_step` = "
        "`encoder_per_step=True`, BatchNorms not folded (the authors' design); (c) `lors` = `method=\"lors\"` "
        "(encoder unrolled in the inner loop); `repblend_auto` = the library's default (`EncoderPass.plan` "
        "chooses one graph, chunks kept or chunks recomputed); `floor` = one encoder forward + one input-gradient "
        "backward of the touched images (BatchNorms folded, graphs kept) + the inner loop on features alone, at "
        "the fastest of its encoder batch sizes (all at once, 20, --encoder_chunk_size). The ratio columns take "
        f"the default mode as (a) when it was measured (here: `{a_mode}`).", "",
        "## Targets", "",
        "| target | measured | where | met |", "|---|---|---|---|",
    ]
    headline = ("fp32", 64, 99)
    # One pair of rows per RepBlend mode in the grid: (a) as configured, and the chunk-graph / unchunked modes.
    for mode in [v for v in ("repblend_auto", "repblend", "repblend_chunks_kept", "repblend_unchunked")
                 if v in variants]:
        label = "(a)" if mode == "repblend" else f"({LABELS[mode]})"
        r = _ratio(get(headline, "repblend_per_step"), get(headline, mode))
        if r is not None:
            lines.append(f"| (b)/{label} ≥ {TARGETS['per_step_over_repblend']}× | {r:.2f}× | N=99, fp32, 64 px | "
                         f"{'yes' if r >= TARGETS['per_step_over_repblend'] else 'no'} |")
        else:
            lines.append(f"| (b)/{label} ≥ {TARGETS['per_step_over_repblend']}× | not in this grid | N=99, fp32, "
                         "64 px | – |")
        measured = {row: r for row in rows if (r := _ratio(get(row, mode), get(row, "floor"))) is not None}
        if measured:
            worst = max(measured, key=measured.get)
            met = sum(r <= TARGETS["repblend_over_floor"] for r in measured.values())
            lines.append(f"| {label}/floor ≤ {TARGETS['repblend_over_floor']}× | worst {measured[worst]:.2f}× "
                         f"({worst[0]}, {worst[1]} px, N={worst[2]}) | {met} of {len(measured)} configurations | "
                         f"{'yes' if met == len(measured) else 'no'} |")
    for e in expert_records:
        lines.append(f"| experts: cached / encoding every batch ≥ {TARGETS['experts_ratio']:.0f}× | "
                     f"{e['ratio']:.1f}× | {e['dataset']}, {e['image_size']} px, {_expert_setting(e)} | "
                     f"{'yes' if e['ratio'] >= TARGETS['experts_ratio'] else 'no'} |")

    if variants:  # --variants "" measures the experts only
        lines += ["", "## Seconds per iteration", "",
                  "| dtype | px | N | " + " | ".join(LABELS[v] for v in variants) + " | (b)/(a) | (a)/floor |",
                  "|---|---|---|" + "---|" * (len(variants) + 2)]
        for row in rows:
            cells = [_fmt((get(row, v) or {}).get("s_per_iter"), ".3f") if "error" not in (get(row, v) or {})
                     else "error" for v in variants]
            lines.append(f"| {row[0]} | {row[1]} | {row[2]} | " + " | ".join(cells) +
                         f" | {_fmt(ratio_b_a[row], '.2f', '×')} | {_fmt(ratio_a_floor[row], '.2f', '×')} |")
        if "floor" in variants:
            lines += ["", "Floor split (s): " + "; ".join(
                f"{r[0]} {r[1]} px N={r[2]}: encoder {get(r, 'floor')['encoder_s_per_iter']:.3f} + heads "
                f"{get(r, 'floor')['heads_s_per_iter']:.3f} at encoder batch "
                f"{get(r, 'floor').get('floor_batch_size', 'chunk')} (per batch: "
                + ", ".join(f"{'all' if b == '0' else b} {t:.3f}"
                            for b, t in get(r, 'floor').get('floor_candidates_s', {}).items())
                + ")" for r in rows
                if get(r, "floor") and "encoder_s_per_iter" in get(r, "floor"))]

        nonfinite = [f"{k[0]} {k[1]} px N={k[2]} {k[3]}" for k, r in runs.items() if r.get("nonfinite_iterations")]
        if nonfinite:
            lines += ["", "Iterations with a non-finite loss (their update was skipped, so they may be cheaper): "
                      + "; ".join(nonfinite) + "."]
        busy = {k: r["other_processes_cores"] for k, r in runs.items() if _oversubscribed(r, env)}
        if busy:
            which = ("all configurations" if len(busy) == len(runs) else
                     "; ".join(f"{k[0]} {k[1]} px N={k[2]} {k[3]}" for k in busy))
            lines += ["", f"**Unreliable:** other processes used {min(busy.values()):.1f}–{max(busy.values()):.1f} "
                      f"cores while these ran, more than the {env['cpu_cores']} cores leave beside the benchmark's "
                      "threads; oversubscribed OpenMP threads slow torch down many-fold (rerun with `--force` on an "
                      f"idle machine, or with fewer `--threads`): {which}."]
        errors = [f"{k[0]} {k[1]} px N={k[2]} {k[3]}" for k, r in runs.items() if "error" in r]
        if errors:
            lines += ["", "Failed configurations (see the JSON for the error): " + "; ".join(errors) + "."]

        mem_kind = next((r["mem_kind"] for r in runs.values() if "mem_kind" in r), "?")
        lines += ["", f"## Peak memory increase per iteration (MB, {mem_kind})", "",
                  "| dtype | px | N | " + " | ".join(LABELS[v] for v in variants) + " |",
                  "|---|---|---|" + "---|" * len(variants)]
        for row in rows:
            cells = [_fmt((get(row, v) or {}).get("peak_mem_increase_mb"), ".0f") for v in variants]
            lines.append(f"| {row[0]} | {row[1]} | {row[2]} | " + " | ".join(cells) + " |")

        lines += ["", "## Image-encoder passes per iteration (images forward / backward)", "",
                  "Counted by a hook on the encoder (backward: images whose encoder output receives a gradient; for "
                  "LoRS one of its three per image and step is the double backward of TESLA's recomputation); for "
                  "(a) and (b) the trainer's own `encoder_passes` counter is shown too.", "",
                  "| dtype | px | N | touched images | " + " | ".join(LABELS[v] for v in variants) + " |",
                  "|---|---|---|---|" + "---|" * len(variants)]
        for row in rows:
            cells = []
            for v in variants:
                p = (get(row, v) or {}).get("encoder_passes_per_iter")
                if not p:
                    cells.append("–")
                    continue
                cell = f"{p['hooked_forward']:.0f} / {p['hooked_backward']:.0f}"
                if "trainer_forward" in p:
                    cell += f" (trainer {p['trainer_forward']:.0f} / {p['trainer_backward']:.0f})"
                cells.append(cell)
            touched = next((r["touched_images"] for v in variants
                            if (r := get(row, v)) and "touched_images" in r), None)
            lines.append(f"| {row[0]} | {row[1]} | {row[2]} | {_fmt(touched, '.0f')} | " + " | ".join(cells) + " |")

        profiled = [(row, v) for row in rows for v in variants if (get(row, v) or {}).get("profile")]
        if profiled:
            lines += ["", "## Profile (torch.profiler over the timed iterations)", "",
                      "Seconds per iteration in each phase: the trainer's `record_function` labels (encoder forward: "
                      "the frozen encoder on the touched images, no-grad when chunked; inner loop: the student's "
                      "steps, TESLA's meta-gradient and, for (b) and LoRS, the encoder inside them; pixel backward: "
                      "the chunked re-forward and the input-gradient backward) and the optimiser step; then the ops "
                      "with the most self time. The profiler's own overhead inflates the totals.", ""]
            for row, v in profiled:
                prof = get(row, v)["profile"]
                ph = prof["phases_s_per_iter"]
                lines += [f"### {LABELS[v]}, {row[0]}, {row[1]} px, N={row[2]}", "",
                          "| " + " | ".join(ph) + " |", "|" + "---|" * len(ph),
                          "| " + " | ".join(f"{x:.3f}" for x in ph.values()) + " |", ""]
                if prof.get("host_phases_s_per_iter"):  # CUDA: the device times above, the host's here
                    host = prof["host_phases_s_per_iter"]
                    lines += ["Host (CPU) seconds per iteration in the same phases: "
                              + ", ".join(f"{k} {x:.3f}" for k, x in host.items())
                              + (f"; {prof['kernel_launches_per_iter']:.0f} kernel launches per iteration"
                                 if prof.get("kernel_launches_per_iter") else "")
                              + (f"; the device's own (self) time of every kernel and copy: "
                                 f"{prof['device_self_s_per_iter']:.3f} s per iteration"
                                 if prof.get("device_self_s_per_iter") is not None else "") + ".", ""]
                lines += ["| op | self s / iter | calls / iter |", "|---|---|---|"]
                lines += [f"| `{o['op']}` | {o['self_s_per_iter']:.3f} | {o['calls_per_iter']:.0f} |"
                          for o in prof["top_ops"]]
                lines.append("")
    lines += ["", "## Expert trajectories: cached features vs encoding every batch", ""]
    if not expert_records:
        lines.append("Not measured (`--skip_experts`, or `--report_only` before any expert measurement).")
    for record in expert_records:  # every expert measurement in this JSON
        pb = record["encoding_per_batch_s"]
        lines.append(f"### {_expert_setting(record)}")
        lines += [
            f"{record['dataset']}, {record['train_images']} train images"
            + (f" and {record['train_captions']} captions (an epoch is one pass over the pairs)"
               if record.get("epoch") == "per_caption" else " (an epoch: one random caption per image)")
            + f", `{record['image_encoder']}` at {record['image_size']} px, batch {record['batch_size']} "
            f"({record['steps_per_epoch']} steps per epoch), "
            f"one symmetric expert, fp32, {record['device']}.", "",
            f"- cached features (`train_experts` on the `FeatureSplit`): {record['cached_epoch_s']:.2f} s per epoch "
            f"(wall time of `train_experts` over {record['cached_epochs_timed']} epoch(s), Trainer set-up and the "
            "trajectory write included, so an upper bound);",
            f"- encoding every batch: {record['encoding_epoch_s']:.1f} s per epoch, extrapolated from the median of "
            f"{record['encoding_batches_timed']} timed batch(es) "
            f"(decode + train transform {pb['load_transform_s']:.3f} s, "
            f"frozen image encoder {pb['encode_s']:.3f} s, "
            + (f"frozen text encoder {pb['encode_captions_s']:.3f} s, " if "encode_captions_s" in pb else "")
            + f"head step {pb['heads_s']:.4f} s per batch; "
            + ("captions encoded too);" if record.get("captions_encoded") else "caption embeddings from the cache);"),
            f"- ratio: **{record['ratio']:.1f}×** (target ≥ {TARGETS['experts_ratio']:.0f}×); within the "
            f"hand-written loop alone (its head step on cached features vs the whole batch): "
            f"{_fmt(record.get('ratio_same_loop'), '.1f', '×')}.", ""]
        if _oversubscribed(record, env):
            lines += [f"**Unreliable:** other processes used {record['other_processes_cores']:.1f} cores on "
                      "average during this measurement; rerun with `--force` on an idle machine.", ""]
    lines += ["", "## End to end at default settings", ""]
    if end_to_end is None:
        lines.append("No `timings.json` found; run `accelerate launch examples/distill.py --output_dir "
                     "benchmarks/results/default_run` (not run by this benchmark).")
    else:
        t = end_to_end["timings"]
        lines.append(f"Read from `{end_to_end['source']}` (a separate `examples/distill.py` run at the default "
                     f"settings, not measured here): features {t.get('features_s')} s, "
                     f"experts {t.get('experts_s')} s, "
                     f"distillation {t.get('distillation_s')} s for {t.get('iterations')} iterations, "
                     f"total **{t.get('total_s')} s** from raw pairs to a distilled set.")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def _expert_setting(e: dict) -> str:
    """What the encode-every-batch side of an expert measurement runs, and how many cached epochs were timed."""
    encoded = ("images and captions encoded every batch" if e.get("captions_encoded")
               else "images encoded every batch")
    return f"{encoded}, cached side timed over {e['cached_epochs_timed']} epoch(s)"


def plot(path: Path, runs: dict[tuple, dict], grid: dict, key: str, ylabel: str, title: str) -> Path:
    """One panel per (dtype, image size): ``key`` against N, one line per variant (log-log)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullLocator

    dtypes, sizes = grid["dtypes"], grid["image_sizes"]
    fig = Figure(figsize=(4.2 * len(sizes), 3.4 * len(dtypes)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(dtypes), len(sizes), squeeze=False)
    for i, dtype in enumerate(dtypes):
        for j, size in enumerate(sizes):
            ax = axes[i][j]
            for variant in grid["variants"]:
                points = sorted((n, r[key]) for n in grid["num_pairs"]
                                if (r := runs.get((dtype, size, n, variant))) and r.get(key) is not None)
                if points:
                    ax.plot(*zip(*points), marker="o", label=LABELS[variant])
            ax.set_xscale("log")
            ax.set_xticks(grid["num_pairs"], [str(n) for n in grid["num_pairs"]])
            ax.xaxis.set_minor_locator(NullLocator())
            if all(r.get(key, 1) > 0 for r in runs.values()):
                ax.set_yscale("log")
            ax.set_title(f"{dtype}, {size} px", fontsize=10)
            ax.set_xlabel("synthetic pairs N")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


# ----- command line ------------------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() in ("true", "1", "yes")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    from repblend_hf.encoders import DEFAULT_IMAGE_ENCODER, DEFAULT_TEXT_ENCODER

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="Smoke run: N 10,20 at 64 px, no warm-up, 1 timed iteration, 2 expert batches, tag 'quick'.")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"Comma-separated, from {list(VARIANTS)}; \"\" measures only the experts.")
    p.add_argument("--num_pairs", default=None, help="Comma-separated N (default 99,199,499,999).")
    p.add_argument("--image_sizes", default=None, help="Comma-separated image sides (default 64,128,224).")
    p.add_argument("--dtypes", "--dtype", default="fp32",
                   help="fp32 and/or bf16 (bf16=True: the encoder runs under bf16 autocast).")
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="Default: cuda when available.")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the usable cores).")
    p.add_argument("--image_encoder", default=DEFAULT_IMAGE_ENCODER, help="Any timm model name.")
    p.add_argument("--pretrained", type=_bool, default=True, help="Load pretrained weights (false: random).")
    p.add_argument("--text_encoder", default=DEFAULT_TEXT_ENCODER, help="Gives the text embedding dimension.")
    p.add_argument("--text_dim", type=int, default=None, help="Text embedding dimension (skips loading the encoder).")
    p.add_argument("--embed_dim", type=int, default=512)
    p.add_argument("--syn_steps", type=int, default=8)
    p.add_argument("--mini_batch_size", type=int, default=20)
    p.add_argument("--sim_rank", type=int, default=10)
    p.add_argument("--encoder_chunk_size", type=int, default=20,
                   help="Images per encoder call of (a), its variants and the floor (0: all at once).")
    p.add_argument("--warmup", type=int, default=None, help="Untimed iterations first (default 1).")
    p.add_argument("--timed", type=int, default=None, help="Timed iterations; the median is reported (default 3).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip_experts", action="store_true", help="Skip the expert comparison (it needs the dataset).")
    p.add_argument("--dataset", default="fashion-scenes", help="Dataset of the expert comparison.")
    p.add_argument("--expert_image_size", type=int, default=64, help="64: the cached features of the default.")
    p.add_argument("--expert_batches", type=int, default=None, help="Timed encode-every-batch batches (default 10).")
    p.add_argument("--expert_encode_captions", action=argparse.BooleanOptionalAction, default=True,
                   help="Run each batch's captions through the frozen text encoder too, as the authors' buffer.py "
                        "does (CLIPModel_full.forward: text_encoder(caption) every batch); "
                        "--no-expert_encode_captions takes them from the cache (images alone encoded every batch).")
    p.add_argument("--expert_cached_epochs", type=int, default=1, help="Epochs of the cached-feature expert.")
    p.add_argument("--timings", default=str(HERE / "results" / "default_run" / "timings.json"),
                   help="timings.json of a default examples/distill.py run (end-to-end time; not run here).")
    p.add_argument("--results_dir", default=str(HERE / "results"))
    p.add_argument("--tag", default=None, help="Suffix of the output names (speed_TAG.json ...); --quick: 'quick'.")
    p.add_argument("--work_dir", default="outputs/speed", help="Where the random trajectories are kept.")
    p.add_argument("--profile", action="store_true",
                   help="Run the timed iterations under torch.profiler: time per phase and the top ops in the report. "
                        "The profiler adds overhead, so give it its own --tag.")
    p.add_argument("--force", action="store_true", help="Measure again configurations already in the JSON.")
    p.add_argument("--report_only", action="store_true",
                   help="Measure nothing: write the report and plots of this grid from the JSON.")
    p.add_argument("--in_process", action="store_true",
                   help="Measure every configuration in this process (faster start; CPU peaks may then be lower).")
    p.add_argument("--config_timeout", type=int, default=3600, help="Seconds before a configuration is abandoned.")
    args = p.parse_args(argv)
    quick = {"num_pairs": "10,20", "image_sizes": "64", "warmup": 0, "timed": 1, "expert_batches": 2, "tag": "quick"}
    full = {"num_pairs": "99,199,499,999", "image_sizes": "64,128,224", "warmup": 1, "timed": 3,
            "expert_batches": 10, "tag": ""}
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    unknown = [v for v in args.variants.split(",") if v and v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; choose from {list(VARIANTS)}")
    bad = [d for d in args.dtypes.split(",") if d not in ("fp32", "bf16")]
    if bad:
        p.error(f"--dtypes takes fp32 and/or bf16, got {bad}")
    if args.warmup < 0 or args.timed < 1:
        p.error(f"need --warmup >= 0 and --timed >= 1, got {args.warmup} and {args.timed}")
    return args


def main(argv: list[str] | None = None) -> dict:
    import torch

    from repblend_hf.encoders import load_image_encoder, load_text_encoder

    args = parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    command = ".venv/bin/python benchmarks/speed.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    suffix = f"_{args.tag}" if args.tag else ""
    results_dir = Path(args.results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"speed{suffix}.json"
    store = json.loads(json_path.read_text()) if json_path.exists() else {}
    store.setdefault("runs", {})
    store.setdefault("experts", {})

    def save() -> None:
        json_path.write_text(json.dumps(store, indent=2) + "\n")

    env = environment(device, args.threads)
    text_dim = args.text_dim or load_text_encoder(args.text_encoder).feature_dim
    grid = {"variants": [v for v in args.variants.split(",") if v], "num_pairs": _ints(args.num_pairs),
            "image_sizes": _ints(args.image_sizes), "dtypes": args.dtypes.split(",")}
    settings = {"image_encoder": args.image_encoder, "pretrained": args.pretrained, "text_dim": text_dim,
                "embed_dim": args.embed_dim, "syn_steps": args.syn_steps, "mini_batch_size": args.mini_batch_size,
                "encoder_chunk_size": args.encoder_chunk_size, "warmup": args.warmup, "timed": args.timed,
                "in_process": args.in_process}

    # Random trajectories: one symmetric (heads) and one asymmetric (encoder + heads) set, reused across the grid.
    trajectory_dirs: dict[bool, str] = {}

    def trajectories_for(variant: str) -> str:
        asymmetric = variant in LORS_VARIANTS
        if asymmetric not in trajectory_dirs:
            encoder = load_image_encoder(args.image_encoder, pretrained=args.pretrained)
            name = (f"asymmetric-encoder-{args.image_encoder}-{text_dim}" if asymmetric
                    else f"symmetric-{args.image_encoder}-{text_dim}-{args.embed_dim}")
            trajectory_dirs[asymmetric] = str(write_random_trajectories(
                Path(args.work_dir) / "trajectories" / name, encoder, text_dim, args.embed_dim, num_epochs=2,
                asymmetric=asymmetric))
        return trajectory_dirs[asymmetric]

    configs = [(d, s, n, v) for d in grid["dtypes"] for s in grid["image_sizes"] for n in grid["num_pairs"]
               for v in grid["variants"]]
    runs: dict[tuple, dict] = {}
    for i, (dtype, size, n, variant) in enumerate(configs, 1):
        spec = {"variant": variant, "num_pairs": n, "image_size": size, "dtype": dtype, "device": device,
                "image_encoder": args.image_encoder, "pretrained": args.pretrained, "text_dim": text_dim,
                "embed_dim": args.embed_dim, "syn_steps": args.syn_steps, "mini_batch_size": args.mini_batch_size,
                "sim_rank": args.sim_rank, "encoder_chunk_size": args.encoder_chunk_size, "warmup": args.warmup,
                "timed": args.timed, "threads": args.threads, "seed": args.seed, "profile": args.profile}
        key = config_key(spec)
        head = f"[{i}/{len(configs)}] {device} {dtype} {size}px N={n} {variant}:"
        record = store["runs"].get(key)
        if record is not None and "error" not in record and not args.force:
            print(f"{head} done before, {record['s_per_iter']:.3f} s/iter (skipped; --force to redo)", flush=True)
        elif args.report_only:
            print(f"{head} {'failed before' if record else 'not measured'} (--report_only)", flush=True)
            if record is not None:
                runs[(dtype, size, n, variant)] = record
            continue
        else:
            spec["trajectory_dir"] = trajectories_for(variant)
            started = time.time()
            record = run_config(spec, args.in_process, args.config_timeout)
            record["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
            store["runs"][key] = record
            save()
            if "error" in record:
                print(f"{head} FAILED after {time.time() - started:.0f} s: {record['error'][-300:]}", flush=True)
            else:
                p = record["encoder_passes_per_iter"]
                print(f"{head} {record['s_per_iter']:.3f} s/iter, peak +{record['peak_mem_increase_mb']:.0f} MB, "
                      f"encoder images fwd/bwd {p['hooked_forward']:.0f}/{p['hooked_backward']:.0f} per iter "
                      f"({time.time() - started:.0f} s)", flush=True)
        runs[(dtype, size, n, variant)] = record

    experts = None
    if not args.skip_experts:
        key = (f"{device}|{args.image_encoder}{'' if args.pretrained else '(random)'}|{args.expert_image_size}px|"
               f"{args.dataset}|d={args.embed_dim}|threads={args.threads}"
               + ("|captions_encoded" if args.expert_encode_captions else "")
               + (f"|cached_epochs={args.expert_cached_epochs}" if args.expert_cached_epochs != 1 else "")
               + "|per_caption_epoch")  # not the earlier measurements of one caption per image and epoch
        experts = store["experts"].get(key)
        if (experts is None or args.force) and not args.report_only:
            print(f"experts: one epoch from cached features vs {args.expert_batches} batches encoding images ...",
                  flush=True)
            experts = measure_experts(args, device)
            experts["measured_at"] = time.strftime("%Y-%m-%d %H:%M:%S")
            store["experts"][key] = experts
            save()
        if experts is not None:
            print(f"experts: cached {experts['cached_epoch_s']:.2f} s/epoch, encoding every batch "
                  f"{experts['encoding_epoch_s']:.1f} s/epoch: {experts['ratio']:.1f}x", flush=True)

    end_to_end = None
    if Path(args.timings).is_file():
        source = os.path.relpath(Path(args.timings).resolve(), ROOT)
        end_to_end = {"source": source, "timings": json.loads(Path(args.timings).read_text())}
        store["end_to_end"] = end_to_end
    store["last_command"] = command
    store["environment"] = env
    store["settings"] = settings
    save()
    ok = {k: r for k, r in runs.items() if "error" not in r}
    write_report(results_dir / f"speed{suffix}.md", command, env, settings, grid, runs,
                 [] if args.skip_experts else list(store["experts"].values()), end_to_end)
    if grid["variants"]:
        plot(results_dir / f"speed_vs_n{suffix}.png", ok, grid, "s_per_iter", "seconds per iteration",
             f"Distillation iteration time ({device}, {args.image_encoder})")
        plot(results_dir / f"memory_vs_n{suffix}.png", ok, grid, "peak_mem_increase_mb",
             "peak memory increase (MB)", f"Distillation peak memory ({device}, {args.image_encoder})")
    pictures = f", speed_vs_n{suffix}.png, memory_vs_n{suffix}.png" if grid["variants"] else ""
    print(f"wrote {json_path} and speed{suffix}.md{pictures} in {results_dir}", flush=True)
    return {"runs": runs, "experts": experts, "end_to_end": end_to_end, "json": str(json_path)}


def _worker(spec_path: str, result_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    Path(result_path).write_text(json.dumps(measure(spec)))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        _worker(sys.argv[2], sys.argv[3])
    else:
        main()
