"""benchmarks/speed.py end to end on tiny random models: the JSON, the report and the plots it writes."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _speed_module():
    spec = importlib.util.spec_from_file_location("speed_benchmark", ROOT / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_args(tmp_path, text_dir):
    return ["--device", "cpu", "--image_encoder", "test_efficientnet", "--pretrained", "false", "--text_encoder",
            str(text_dir), "--embed_dim", "8", "--num_pairs", "6", "--image_sizes", "32", "--syn_steps", "2",
            "--mini_batch_size", "4", "--sim_rank", "2", "--encoder_chunk_size", "4", "--warmup", "0", "--timed", "1",
            "--threads", "1", "--results_dir", str(tmp_path / "results"), "--work_dir", str(tmp_path / "work"),
            "--tag", "tiny"]


@pytest.fixture(autouse=True)
def _keep_torch_threads():
    """The benchmark sets torch's thread count for its process (one thread here: fast on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_speed_benchmark_writes_every_measurement_and_resumes(tiny_karpathy_dir, tiny_text_encoder_dir, tmp_path):
    speed = _speed_module()
    timings = tmp_path / "timings.json"
    timings.write_text(json.dumps({"features_s": 1.0, "experts_s": 2.0, "distillation_s": 3.0, "total_s": 6.0,
                                   "iterations": 10}))
    argv = [*_tiny_args(tmp_path, tiny_text_encoder_dir), "--variants", "floor,repblend,repblend_per_step,lors",
            "--in_process", "--dataset", str(tiny_karpathy_dir), "--expert_image_size", "32", "--expert_batches", "1",
            "--timings", str(timings)]
    speed.main(argv)

    results = tmp_path / "results"
    store = json.loads((results / "speed_tiny.json").read_text())
    assert set(store) >= {"runs", "experts", "end_to_end", "environment", "settings", "last_command"}
    runs = {r["variant"]: r for r in store["runs"].values()}
    assert set(runs) == {"floor", "repblend", "repblend_per_step", "lors"}
    for variant, r in runs.items():
        assert "error" not in r, r
        assert r["num_pairs"] == 6 and r["image_size"] == 32 and r["dtype"] == "fp32" and r["device"] == "cpu"
        assert r["s_per_iter"] > 0 and len(r["s_per_iter_timed"]) == 1
        assert {"peak_mem_mb", "peak_mem_increase_mb", "mem_kind", "touched_images", "other_processes_cores"} <= set(r)
        assert r["encoder_passes_per_iter"]["hooked_forward"] > 0, variant
    assert runs["floor"]["encoder_s_per_iter"] > 0 and runs["floor"]["heads_s_per_iter"] > 0
    # The floor is measured at every candidate encoder batch and is the fastest of them: a lower bound that does
    # not depend on the chunk size (a) was given.
    floor = runs["floor"]
    assert speed.floor_batch_sizes(4) == [0, 4, 20] and speed.floor_batch_sizes(-1) == [0, 20]
    assert set(floor["floor_candidates_s"]) == {"0", "4", "20"}  # --encoder_chunk_size 4
    assert floor["s_per_iter"] == min(floor["floor_candidates_s"].values())
    assert floor["floor_candidates_s"][str(floor["floor_batch_size"])] == floor["s_per_iter"]
    # The trainer's own counter and the hook agree on every path; (b) runs the encoder in every step.
    for variant in ("repblend", "repblend_per_step", "lors"):
        p = runs[variant]["encoder_passes_per_iter"]
        assert (p["trainer_forward"], p["trainer_backward"]) == (p["hooked_forward"], p["hooked_backward"])
    assert runs["repblend_per_step"]["encoder_passes_per_iter"]["hooked_forward"] == 2 * 2 * 4  # steps × batch × 2
    assert all(r["nonfinite_iterations"] == 0 for v, r in runs.items() if v != "floor")

    (experts,) = store["experts"].values()
    assert experts["cached_epoch_s"] > 0 and experts["encoding_epoch_s"] > 0
    assert experts["ratio"] > 0 and experts["ratio_same_loop"] > 1
    # An expert epoch is one pass over the (image, caption) pairs, on both sides of the comparison.
    assert experts["train_images"] == 40 and experts["train_captions"] > 40 and experts["epoch"] == "per_caption"
    assert experts["steps_per_epoch"] == -(-experts["train_captions"] // experts["batch_size"])
    assert store["end_to_end"]["timings"]["total_s"] == 6.0

    report = (results / "speed_tiny.md").read_text()
    assert report.startswith("# Distillation speed and memory") and "Command: `" in report
    assert "(a)/floor ≤ 1.2×" in report and "total **6.0 s**" in report
    for name in ("speed_vs_n_tiny.png", "memory_vs_n_tiny.png"):
        assert (results / name).stat().st_size > 0

    # By default the encode-every-batch side is the authors' buffer.py: images and captions through the encoders.
    assert experts["captions_encoded"] and experts["encoding_per_batch_s"]["encode_captions_s"] > 0
    assert "frozen text encoder" in (results / "speed_tiny.md").read_text()

    # A rerun keeps the finished configurations instead of measuring them again; taking the captions from the
    # cache (images alone encoded every batch) is another expert measurement, kept beside the first.
    speed.main([*argv, "--no-expert_encode_captions"])
    again = json.loads((results / "speed_tiny.json").read_text())
    assert again["runs"] == store["runs"]
    assert len(again["experts"]) == 2 and all(again["experts"][k] == v for k, v in store["experts"].items())
    (images_only,) = [v for k, v in again["experts"].items() if k not in store["experts"]]
    assert not images_only["captions_encoded"] and "encode_captions_s" not in images_only["encoding_per_batch_s"]
    report = (results / "speed_tiny.md").read_text()
    # Both expert measurements are reported, each against the target.
    assert report.count("| experts: cached / encoding every batch ≥ 50× |") == 2
    assert "### images and captions encoded every batch" in report and "### images encoded every batch" in report

    # An empty --variants measures the experts alone: no iteration table, nothing new in the runs.
    experts_only = [*argv[:argv.index("--variants")], "--variants", "", *argv[argv.index("--variants") + 2:]]
    speed.main(experts_only)
    report = (results / "speed_tiny.md").read_text()
    assert "## Seconds per iteration" not in report and "## Expert trajectories" in report
    assert json.loads((results / "speed_tiny.json").read_text())["runs"] == store["runs"]


@pytest.mark.slow
def test_speed_benchmark_measures_in_a_fresh_process(tiny_text_encoder_dir, tmp_path):
    speed = _speed_module()
    speed.main([*_tiny_args(tmp_path, tiny_text_encoder_dir), "--variants", "repblend", "--skip_experts",
                "--timings", str(tmp_path / "missing.json")])
    store = json.loads((tmp_path / "results" / "speed_tiny.json").read_text())
    (record,) = store["runs"].values()
    assert "error" not in record, record
    assert record["s_per_iter"] > 0 and record["mem_kind"].startswith("cpu VmHWM")
    assert "No `timings.json` found" in (tmp_path / "results" / "speed_tiny.md").read_text()


def test_speed_benchmark_profile_splits_the_iteration_into_phases(tiny_text_encoder_dir, tmp_path):
    speed = _speed_module()
    speed.main([*_tiny_args(tmp_path, tiny_text_encoder_dir), "--variants", "floor,repblend,repblend_per_step",
                "--warmup", "1", "--profile", "--in_process", "--skip_experts",
                "--timings", str(tmp_path / "missing.json")])
    store = json.loads((tmp_path / "results" / "speed_tiny.json").read_text())
    assert all(key.endswith("|profiled") for key in store["runs"])
    runs = {r["variant"]: r for r in store["runs"].values()}
    # The labelled phases of the trainer (and of the floor's hand-written iteration) are found and timed.
    for variant in ("floor", "repblend"):
        phases = runs[variant]["profile"]["phases_s_per_iter"]
        assert {"encoder_forward", "inner_loop", "pixel_backward"} <= set(phases), (variant, phases)
        assert all(phases[p] > 0 for p in speed.PHASES)
        assert phases["iteration"] >= phases["inner_loop"]
    assert runs["repblend"]["profile"]["phases_s_per_iter"]["optimizer_step"] > 0
    # (b) runs the encoder inside the inner loop: no separate forward or pixel backward phase.
    per_step_phases = set(runs["repblend_per_step"]["profile"]["phases_s_per_iter"])
    assert not per_step_phases & {"encoder_forward", "pixel_backward"}
    top = runs["repblend"]["profile"]["top_ops"]
    assert top and all(o["self_s_per_iter"] >= 0 and o["calls_per_iter"] > 0 for o in top)
    assert top == sorted(top, key=lambda o: o["self_s_per_iter"], reverse=True)
    report = (tmp_path / "results" / "speed_tiny.md").read_text()
    assert "## Profile (torch.profiler" in report and "### (a) RepBlend, fp32, 32 px, N=6" in report


def test_profile_summary_keeps_the_host_and_device_events_of_a_phase_apart():
    """On CUDA a ``record_function`` range is two events with one key, the host's and the GPU annotation's;
    the phase's device span comes from the latter and its host time from the former, whatever their order."""
    from types import SimpleNamespace

    speed = _speed_module()

    def event(key, device_type, device_us=0.0, cpu_us=0.0, self_device_us=0.0, count=2):
        return SimpleNamespace(key=key, device_type=f"DeviceType.{device_type}", device_time_total=device_us,
                               self_device_time_total=self_device_us, cpu_time_total=cpu_us,
                               self_cpu_time_total=cpu_us, count=count)

    host, span = event("repblend:inner_loop", "CPU", cpu_us=4e5), event("repblend:inner_loop", "CUDA", device_us=3e5)
    ops = [event("cudaLaunchKernel", "CPU", cpu_us=1e5, count=2000), event("void gemm", "CUDA", 1e5, 0, 1e5, 40)]
    for order in ([host, span], [span, host]):
        summary = speed.profile_summary([*order, *ops], 2, "cuda")
        assert summary["phases_s_per_iter"] == {"inner_loop": pytest.approx(0.15)}
        assert summary["host_phases_s_per_iter"] == {"inner_loop": pytest.approx(0.2)}
        assert summary["kernel_launches_per_iter"] == 1000 and summary["device_self_s_per_iter"] == pytest.approx(0.05)
    on_cpu = speed.profile_summary([host, *ops], 2, "cpu")  # a CPU run: the host events alone, no host split
    assert on_cpu["phases_s_per_iter"] == {"inner_loop": pytest.approx(0.2)} and on_cpu["host_phases_s_per_iter"] == {}


@pytest.mark.parametrize("variant", ["floor", "repblend", "repblend_per_step", "lors"])
def test_the_benchmark_times_the_trainers_own_iteration(tiny_text_encoder_dir, tmp_path, variant):
    """speed.py has no copy of the iteration: its timed function, on the trainer's inputs, gives the trainer's
    gradients exactly (the same library function; only the Trainer shell is left out)."""
    # One thread: with several, oneDNN's convolution backward can sum in another order from one call to the next
    # (about 1 run in 4 differed in the last bits with 2 threads), and this test compares exactly.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _same_gradients(tiny_text_encoder_dir, tmp_path, variant)
    finally:
        torch.set_num_threads(threads)


def _same_gradients(tiny_text_encoder_dir, tmp_path, variant):
    from repblend_hf.distillation import encoder_pass_for, student_heads
    from repblend_hf.encoders import load_image_encoder
    from repblend_hf.trainers import DistillationTrainer
    from repblend_hf.trajectories import ExpertTrajectories

    speed = _speed_module()
    spec = {"variant": variant, "num_pairs": 6, "image_size": 32, "dtype": "fp32", "device": "cpu",
            "image_encoder": "test_efficientnet", "pretrained": False, "text_dim": 16, "embed_dim": 8, "syn_steps": 2,
            "mini_batch_size": 4, "sim_rank": 2, "encoder_chunk_size": 4, "warmup": 0, "timed": 1, "seed": 3}
    encoder = load_image_encoder("test_efficientnet", image_size=32, pretrained=False)
    trajectories = ExpertTrajectories.load(speed.write_random_trajectories(
        tmp_path / "trajectories", encoder, 16, 8, num_epochs=2, asymmetric=variant == "lors"))
    args = speed._distillation_args(spec, str(tmp_path / "run"))

    trainer_set = speed._synthetic_set(spec, encoder.feature_dim, args.similarity)
    trainer = DistillationTrainer(trainer_set, args, trajectories, encoder)
    trainer.create_optimizer()
    trainer.compute_loss(trainer.model, {"iteration": torch.tensor([0])}).backward()

    timed_set = speed._synthetic_set(spec, encoder.feature_dim, args.similarity)
    result, seconds, encoder_seconds = speed.timed_iteration(
        timed_set, student_heads(timed_set.config), trajectories, encoder_pass_for(encoder, timed_set.config, args),
        args, step=0)
    assert seconds >= encoder_seconds >= 0
    names = {id(p): n for n, p in timed_set.named_parameters()}
    grads = {names[id(p)]: g for p, g in result.gradients}
    for name, p in trainer_set.named_parameters():
        assert torch.equal(p.grad, grads[name]), name
    assert grads["text_embeddings"].abs().sum() > 0
