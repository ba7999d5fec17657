"""The commands end to end on tiny inputs: the example scripts under ``accelerate launch`` like a user runs them,
and the console scripts that ``setup.cfg`` declares."""

import configparser
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from hub_server import TEST_USER, hub_fixture  # noqa: F401 - registers the "hub" fixture

ROOT = Path(__file__).resolve().parents[1]


def _tiny_data_args(karpathy_dir, text_dir):
    return ["--dataset", str(karpathy_dir), "--image_encoder", "test_efficientnet", "--pretrained_image_encoder",
            "false", "--text_encoder", str(text_dir), "--image_size", "32", "--num_views", "1",
            "--encode_batch_size", "16"]


_LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no"]


def _launch(script, args, cwd, env_extra=None, processes=1):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true", **(env_extra or {})}
    # `--cpu --num_processes 2` starts one process; `--multi_gpu` with ACCELERATE_USE_CPU starts two gloo ranks.
    launch = _LAUNCH if processes == 1 else [
        *_LAUNCH[:3], "--multi_gpu", "--num_processes", str(processes), *_LAUNCH[5:]]
    cmd = [*launch, str(ROOT / "examples" / script), *args]
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    return result


@pytest.mark.slow
def test_distill_script_end_to_end_resume_and_push(tiny_karpathy_dir, tiny_text_encoder_dir, tmp_path, hub):
    out = tmp_path / "run"
    args = [*_tiny_data_args(tiny_karpathy_dir, tiny_text_encoder_dir), "--config", "none", "--num_pairs", "8",
            "--sim_rank", "2", "--embed_dim", "8", "--num_experts", "2", "--expert_train_epochs", "3",
            "--max_steps", "4", "--save_steps", "2", "--eval_strategy", "steps", "--eval_steps", "2",
            "--eval_head_epochs", "3", "--mini_batch_size", "4", "--syn_steps", "2", "--lr_img", "1", "--lr_txt",
            "1", "--lr_sim", "0.1", "--lr_lr", "0.0001", "--eval_seeds", "2", "--baselines", "random,full",
            "--output_dir", str(out), "--disable_tqdm", "true"]
    result = _launch("distill.py", args, tmp_path)
    assert "| repblend | 8 |" in result.stdout and "| random | 8 |" in result.stdout
    record = json.loads((out / "results.json").read_text())
    assert record["method"] == "repblend" and record["pairs"] == 8 and record["seeds"] == 2
    assert set(record["test"]) == {"IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10", "r_mean"}
    seeds = {b["method"]: b["seeds"] for b in json.loads((out / "baselines.json").read_text())["baselines"]}
    assert seeds == {"random": 2, "full": 1}, seeds  # the full data: one seed by default (--full_data_seeds)
    for name in ("synthetic_images.png", "similarity.png", "training_curves.png", "baselines.json",
                 "synthetic_set/config.json", "synthetic_set/data/train-00000-of-00001.parquet",
                 "experts/trajectories.json", "experts/expert_001.safetensors", "checkpoint-4"):
        assert (out / name).exists(), name

    # Evaluate the saved set with the evaluation script (its own fresh heads).
    ev = _launch("evaluate.py", [*_tiny_data_args(tiny_karpathy_dir, tiny_text_encoder_dir), "--method", "distilled",
                                 "--distilled_set", str(out / "synthetic_set"), "--seeds", "1",
                                 "--output_dir", str(tmp_path / "ev")], tmp_path)
    assert "| distilled | 8 |" in ev.stdout
    # The coresets' protocol on the same set: InfoNCE with identity targets instead of its learned S.
    ev = _launch("evaluate.py", [*_tiny_data_args(tiny_karpathy_dir, tiny_text_encoder_dir), "--method", "distilled",
                                 "--distilled_set", str(out / "synthetic_set"), "--seeds", "1", "--loss", "infonce",
                                 "--lr", "0.1", "--output_dir", str(tmp_path / "ev_infonce")], tmp_path)
    settings = json.loads((tmp_path / "ev_infonce" / "results.json").read_text())["settings"]
    assert settings["loss"] == "infonce" and settings["lr"] == 0.1, settings

    # Running again with more steps resumes from the last checkpoint, reuses the experts, and pushes the set
    # (to the Hub stand-in) from the main process.
    expert_mtime = (out / "experts" / "expert_000.safetensors").stat().st_mtime_ns
    args[args.index("--max_steps") + 1] = "6"
    repo = f"{TEST_USER}/tiny-distilled"
    again = _launch("distill.py", [*args, "--resume_from_checkpoint", "latest", "--hub_dataset_id", repo], tmp_path,
                    env_extra=hub.env)
    assert "resuming from" in again.stderr and "checkpoint-4" in again.stderr
    assert (out / "checkpoint-6").exists()
    timings = json.loads((out / "timings.json").read_text())  # this process timed iterations 5-6 only
    assert (timings["iterations"], timings["resumed_from_iteration"]) == (6, 4), timings
    # The machine behind the seconds: this one's CPU, its cores, torch's threads, no GPU in tests.
    assert timings["machine"]["cpu"] and timings["machine"]["cpu_count"] == os.cpu_count(), timings["machine"]
    assert timings["machine"]["torch_threads"] >= 1 and timings["machine"]["accelerator"] is None
    assert timings["machine"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert (out / "experts" / "expert_000.safetensors").stat().st_mtime_ns == expert_mtime
    check = subprocess.run([sys.executable, "-c", (
        "import sys, torch; from datasets import load_dataset; from repblend_hf import SyntheticSet\n"
        f"rows = load_dataset({repo!r}, split='train'); hub = SyntheticSet.from_hub({repo!r})\n"
        f"local = SyntheticSet.from_pretrained({str(out / 'synthetic_set')!r})\n"
        "same = all(torch.equal(a, b) for a, b in zip(hub.state_dict().values(), local.state_dict().values()))\n"
        "print(len(rows), same)")], env={**os.environ, **hub.env}, capture_output=True, text=True, timeout=300)
    assert check.stdout.split()[-2:] == ["8", "True"], check.stderr[-3000:]


@pytest.mark.slow
def test_distill_script_with_two_processes(tiny_karpathy_dir, tiny_text_encoder_dir, tmp_path):
    """2 gloo ranks: data-parallel experts, one segment per rank per step, replicas identical, outputs written once."""
    from repblend_hf import SyntheticSet

    args = [*_tiny_data_args(tiny_karpathy_dir, tiny_text_encoder_dir), "--config", "none", "--num_pairs", "8",
            "--sim_rank", "2", "--embed_dim", "8", "--num_experts", "2", "--expert_train_epochs", "2",
            "--max_steps", "3", "--save_steps", "3", "--eval_strategy", "no", "--mini_batch_size", "4",
            "--syn_steps", "2", "--lr_img", "1", "--lr_txt", "1", "--lr_sim", "0.1", "--eval_seeds", "1",
            "--baselines", "", "--disable_tqdm", "true", "--max_start_epoch", "1", "--seed", "3"]
    two = _launch("distill.py", [*args, "--output_dir", str(tmp_path / "two")], tmp_path, processes=2)
    one = _launch("distill.py", [*args, "--output_dir", str(tmp_path / "one")], tmp_path)

    timings = json.loads((tmp_path / "two" / "timings.json").read_text())
    assert timings["processes"] == 2 and timings["iterations"] == 3
    assert len(timings["replica_checksums"]) == 2 and len(set(timings["replica_checksums"])) == 1
    assert json.loads((tmp_path / "one" / "timings.json").read_text())["processes"] == 1
    # Written once: one table, one results file, one checkpoint folder, the experts complete.
    assert two.stdout.count("timings:") == 1 and two.stdout.count("| repblend | 8 |") == 1
    assert sorted(p.name for p in (tmp_path / "two").glob("checkpoint-*")) == ["checkpoint-3"]
    assert sorted(p.name for p in (tmp_path / "two" / "experts").glob("*.safetensors")) == [
        "expert_000.safetensors", "expert_001.safetensors"]
    # Two segments per step instead of one: a different set from the one-process run (same seed, same init).
    a = SyntheticSet.from_pretrained(tmp_path / "two" / "synthetic_set").state_dict()
    b = SyntheticSet.from_pretrained(tmp_path / "one" / "synthetic_set").state_dict()
    assert not torch.equal(a["pixel_values"], b["pixel_values"])
    assert one.stdout.count("timings:") == 1


@pytest.mark.slow
def test_kill_9_then_resume_latest_equals_an_uninterrupted_run(tiny_karpathy_dir, tiny_text_encoder_dir, tmp_path):
    """SIGKILL the launched run after its first checkpoint; the same command with ``--resume_from_checkpoint latest``
    finishes with the same synthetic set as a run that was never interrupted."""
    from repblend_hf import SyntheticSet

    args = [*_tiny_data_args(tiny_karpathy_dir, tiny_text_encoder_dir), "--config", "none", "--num_pairs", "8",
            "--sim_rank", "2", "--embed_dim", "8", "--num_experts", "2", "--expert_train_epochs", "2",
            "--max_steps", "60", "--save_steps", "2", "--eval_strategy", "no", "--mini_batch_size", "4",
            "--syn_steps", "2", "--lr_img", "0.1", "--lr_txt", "0.1", "--lr_sim", "0.01", "--eval_seeds", "1",
            "--baselines", "", "--disable_tqdm", "true", "--max_start_epoch", "1",
            "--trajectory_dir", str(tmp_path / "experts")]
    _launch("distill.py", [*args, "--output_dir", str(tmp_path / "whole")], tmp_path)

    killed = tmp_path / "killed"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.Popen([*_LAUNCH, str(ROOT / "examples" / "distill.py"), *args, "--output_dir", str(killed)],
                            cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.time() + 300
    while not (killed / "checkpoint-2" / "trainer_state.json").exists() and proc.poll() is None:
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its worker, mid-run
    proc.wait()
    assert not (killed / "results.json").exists(), "the run finished before it was killed; raise --max_steps"

    resumed = _launch("distill.py", [*args, "--output_dir", str(killed), "--resume_from_checkpoint", "latest"],
                      tmp_path)
    assert "resuming from" in resumed.stderr and "checkpoint-" in resumed.stderr
    a = SyntheticSet.from_pretrained(tmp_path / "whole" / "synthetic_set").state_dict()
    b = SyntheticSet.from_pretrained(killed / "synthetic_set").state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_lors_is_reported_under_its_own_protocol_and_the_shared_one(tiny_karpathy_dir, tiny_text_encoder_dir,
                                                                    tmp_path):
    """LoRS as released: experts and student train the image encoder + text head (embed_dim = the encoder's width);
    the set is scored by fine-tuning the encoder on its pixels *and* by fresh heads on frozen features."""
    out = tmp_path / "lors"
    data = _tiny_data_args(tiny_karpathy_dir, tiny_text_encoder_dir)
    args = [*data, "--config", "none", "--method", "lors", "--num_pairs", "8", "--sim_rank", "2", "--embed_dim", "256",
            "--num_experts", "1", "--expert_train_epochs", "2", "--max_steps", "2", "--save_strategy", "no",
            "--eval_strategy", "no", "--mini_batch_size", "4", "--syn_steps", "2", "--max_start_epoch", "1",
            "--lr_img", "1", "--lr_txt", "1", "--lr_sim", "0.1", "--lr_lr", "0.0001", "--eval_seeds", "1",
            "--baselines", "", "--output_dir", str(out), "--disable_tqdm", "true"]
    result = _launch("distill.py", args, tmp_path)
    assert "| lors (own protocol: fine-tuned encoder) | 8 |" in result.stdout
    assert "| lors (shared protocol: frozen encoder) | 8 |" in result.stdout
    record = json.loads((out / "results.json").read_text())
    assert record["protocol"] == "finetune_encoder" and record["settings"]["image_head"] is False
    assert record["settings"]["matching"] == "asymmetric" and record["settings"]["asymmetric_image_head"] is False
    assert record["shared_protocol"]["protocol"] == "frozen_encoder"
    assert set(record["shared_protocol"]["test"]) == set(record["test"])
    assert json.loads((out / "experts" / "trajectories.json").read_text())["image_branch"] == "encoder"
    config = json.loads((out / "synthetic_set" / "config.json").read_text())
    assert (config["matching"], config["asymmetric_image_head"], config["embed_dim"]) == ("asymmetric", False, 256)

    # evaluate.py: the saved set's own protocol by default, the shared one on request.
    for protocol, expected in (("own", "finetune_encoder"), ("frozen", "frozen_encoder")):
        _launch("evaluate.py", [*data, "--method", "distilled", "--distilled_set", str(out / "synthetic_set"),
                                "--seeds", "1", "--epochs", "2", "--protocol", protocol, "--output_dir",
                                str(tmp_path / protocol)], tmp_path)
        assert json.loads((tmp_path / protocol / "results.json").read_text())["protocol"] == expected


def test_distill_run_check_names_the_embed_dim_of_the_asymmetric_student(tmp_path):
    from transformers import HfArgumentParser

    from repblend_hf.checks import check_distill_run
    from repblend_hf.commands.distill import SetArguments
    from repblend_hf.pipeline import DataArguments, parse_with_config

    parser = HfArgumentParser((DataArguments, SetArguments, __import__("repblend_hf").DistillationArguments))
    argv = ["--config", "none", "--image_encoder", "test_efficientnet", "--output_dir", str(tmp_path / "out"),
            "--expert_train_epochs", "2", "--method", "lors", "--embed_dim", "8"]
    with pytest.raises(ValueError, match=r"set --embed_dim 256 \(test_efficientnet's feature width; got 8\), or "
                                         r"--asymmetric_image_head true"):
        check_distill_run(*parse_with_config(parser, argv))
    check_distill_run(*parse_with_config(parser, [*argv, "--asymmetric_image_head", "true"]))  # the ablation: any dim
    check_distill_run(*parse_with_config(parser, [*argv[:-2], "--embed_dim", "256"]))
    check_distill_run(*parse_with_config(parser, [*argv[:-4], "--embed_dim", "8"]))  # symmetric: any dim


@pytest.mark.slow
def test_a_set_in_stages_grows_a_saved_set_resumes_and_evaluates_from_its_config(tiny_karpathy_dir,
                                                                                 tiny_text_encoder_dir, tmp_path):
    """A 4-pair set, then grown by 4 more pairs against conditioned experts (PDD) with a shortcut target (PTM-ST);
    the run resumed does nothing twice, and repblend-evaluate trains the saved set stage by stage from config.json."""
    from repblend_hf import SyntheticSet

    common = [*_tiny_data_args(tiny_karpathy_dir, tiny_text_encoder_dir), "--config", "none", "--sim_rank", "2",
              "--embed_dim", "8", "--num_experts", "2", "--expert_train_epochs", "3", "--max_steps", "2",
              "--save_steps", "2", "--eval_strategy", "no", "--eval_head_epochs", "3", "--mini_batch_size", "4",
              "--syn_steps", "2", "--lr_img", "1", "--lr_txt", "1", "--lr_sim", "0.1", "--lr_lr", "0.0001",
              "--eval_seeds", "1", "--baselines", "", "--disable_tqdm", "true", "--synthetic_space", "features",
              "--trajectory_dir", str(tmp_path / "experts")]
    _launch("distill.py", [*common, "--num_pairs", "4", "--output_dir", str(tmp_path / "small")], tmp_path)
    grown = tmp_path / "grown"
    staged = [*common, "--num_pairs", "8", "--stage_pairs", "4", "4", "--initial_stages",
              str(tmp_path / "small" / "synthetic_set"), "--stage_targets", "conditioned", "--shortcut_epoch", "3",
              "--max_time_minutes", "30", "--output_dir", str(grown)]
    _launch("distill.py", staged, tmp_path)
    small = SyntheticSet.from_pretrained(tmp_path / "small" / "synthetic_set")
    whole = SyntheticSet.from_pretrained(grown / "synthetic_set")
    assert torch.equal(whole.images[:4], small.images)  # the first stage is the saved set, unchanged
    assert [st["num_pairs"] for st in whole.config.stages] == [4, 4]
    assert whole.config.stages[1]["targets"] == "conditioned" and whole.config.stages[1]["iterations"] == 2
    meta = json.loads((grown / "stage_2" / "experts" / "trajectories.json").read_text())
    assert meta["conditioned_on"] == small.fingerprint() and meta["num_epochs"] == 3
    timings = json.loads((grown / "timings.json").read_text())
    assert timings["iterations"] == 2  # this run's stages; the saved set's iterations are in its own record
    budget = json.loads((grown / "stage_2" / "checkpoint-2" / "trainer_state.json").read_text())["stateful_callbacks"]
    assert budget["TimeBudget"]["args"]["max_seconds"] == 1800  # the one stage distilled here has the whole budget

    again = _launch("distill.py", [*staged, "--resume_from_checkpoint", "latest"], tmp_path)
    assert "stage_2/checkpoint-2" in again.stderr and "training []" in again.stderr  # nothing trained twice
    assert torch.equal(SyntheticSet.from_pretrained(grown / "synthetic_set").images, whole.images)

    _launch("evaluate.py", [*_tiny_data_args(tiny_karpathy_dir, tiny_text_encoder_dir), "--method", "distilled",
                            "--distilled_set", str(grown / "synthetic_set"), "--seeds", "1", "--epochs", "3",
                            "--output_dir", str(tmp_path / "ev")], tmp_path)
    settings = json.loads((tmp_path / "ev" / "results.json").read_text())["settings"]
    assert [(p["start"], p["end"], p["steps"]) for p in settings["stages"]] == [(0, 4, None), (0, 8, 2)]
    assert settings["stages"][0]["lr_img"] == pytest.approx(small.config.inner_lr_img)


def test_evaluate_script_writes_the_results_schema(tiny_karpathy_dir, tiny_text_encoder_dir, tmp_path):
    result = _launch("evaluate.py", [*_tiny_data_args(tiny_karpathy_dir, tiny_text_encoder_dir), "--method",
                                     "herding", "--pairs", "10", "--seeds", "2", "--embed_dim", "8", "--output_dir",
                                     str(tmp_path / "out")], tmp_path)
    record = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {k: record[k] for k in ("dataset", "method", "pairs", "seeds")} == {
        "dataset": str(tiny_karpathy_dir), "method": "herding", "pairs": 10, "seeds": 2}
    for split in ("validation", "test"):
        assert set(record[split]) == {"IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10", "r_mean"}
        assert all(set(v) == {"mean", "std"} for v in record[split].values())
    assert "| herding | 10 |" in result.stdout


@pytest.mark.parametrize("config", sorted((ROOT / "examples" / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_parses(config, tmp_path):
    from transformers import HfArgumentParser

    from repblend_hf.commands.distill import SetArguments
    from repblend_hf.pipeline import DataArguments, parse_with_config

    parser = HfArgumentParser((DataArguments, SetArguments, __import__("repblend_hf").DistillationArguments))
    data_args, set_args, args = parse_with_config(parser, ["--config", str(config), "--output_dir", str(tmp_path)])
    assert args.method == "repblend" and args.matching == "symmetric"
    # RepBlend's β = 1 unless the file sets another (the feature-space config takes β = 0, its validation winner)
    assert args.blend_beta == float(yaml.safe_load(config.read_text()).get("blend_beta", 1.0))
    assert args.output_dir == str(tmp_path)  # the command line wins over the file
    if config.stem.startswith("coco"):
        assert args.branch_normalization == "joint"
    if config.stem == "fashion_scenes_99":
        assert data_args.dataset == "fashion-scenes" and set_args.num_pairs == 99
        assert set_args.embed_dim == 1280  # heads as wide as EfficientNet-Lite0's features (docs/results.md)


def _console_scripts() -> dict[str, str]:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    lines = config["options.entry_points"]["console_scripts"].strip().splitlines()
    return dict(tuple(part.strip() for part in line.split("=")) for line in lines)


def test_console_scripts_are_the_commands_and_run_from_any_directory(tmp_path):
    """What ``pip install`` turns into ``repblend-distill`` / ``repblend-evaluate``, run as its wrapper runs it
    (``sys.exit(cli())``), from a directory without the repository: ``--help`` lists the arguments, exit 0."""
    scripts = _console_scripts()
    assert scripts == {"repblend-distill": "repblend_hf.commands.distill:cli",
                       "repblend-evaluate": "repblend_hf.commands.evaluate:cli"}
    for name, target in scripts.items():
        module, function = target.split(":")
        wrapper = f"import sys; sys.argv[0] = {name!r}; from {module} import {function}; sys.exit({function}())"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
        result = subprocess.run([sys.executable, "-c", wrapper, "--help"], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
        assert f"usage: {name}" in result.stdout and "--output_dir" in result.stdout
        assert ("--hub_dataset_id" in result.stdout) == (name == "repblend-distill")


def test_the_default_config_ships_in_the_package_and_the_example_reads_the_same_file():
    from repblend_hf.commands.distill import DEFAULT_CONFIG

    assert DEFAULT_CONFIG.is_file() and ROOT / "repblend_hf" in DEFAULT_CONFIG.parents
    example = ROOT / "examples" / "configs" / "fashion_scenes_99.yaml"
    assert example.is_symlink() and example.resolve() == DEFAULT_CONFIG  # one copy: the example links to it
    # and no other config is a second copy of one: every file of examples/configs/ differs from every other
    texts = [p.read_text() for p in (ROOT / "examples" / "configs").glob("*.yaml") if not p.is_symlink()]
    assert len(set(texts)) == len(texts) and DEFAULT_CONFIG.read_text() not in texts


def test_cli_returns_none_so_the_console_script_exits_0(monkeypatch):
    """A console script runs ``sys.exit(cli())``: a dict (what ``main`` returns) would exit with status 1."""
    import repblend_hf.commands.distill as distill
    import repblend_hf.commands.evaluate as evaluate

    seen = []
    monkeypatch.setattr(sys, "argv", ["repblend-x", "--max_steps", "3"])
    for module in (distill, evaluate):
        monkeypatch.setattr(module, "main", lambda argv: seen.append(argv) or {"records": []})
        assert module.cli() is None
    assert seen == [["--max_steps", "3"]] * 2


def test_hub_dataset_id_names_the_dataset_repo_and_the_old_spelling_still_works(tmp_path):
    from repblend_hf import DistillationArguments
    from repblend_hf.commands.distill import SetArguments, hub_dataset_repo

    def resolve(set_kw, **kw):
        args = DistillationArguments(output_dir=str(tmp_path / "my-run"), report_to="none", **kw)
        return hub_dataset_repo(SetArguments(**set_kw), args), args.push_to_hub

    assert resolve({}) == (None, False)
    assert resolve({"hub_dataset_id": "me/set"}) == ("me/set", False)
    with pytest.warns(FutureWarning, match=r"deprecated .* use --hub_dataset_id me/old"):
        assert resolve({}, push_to_hub=True, hub_model_id="me/old") == ("me/old", False)  # Trainer's push: off
    with pytest.warns(FutureWarning, match="use --hub_dataset_id my-run"):
        assert resolve({}, push_to_hub=True) == ("my-run", False)  # the output folder's name, as before
    with pytest.warns(FutureWarning):
        assert resolve({"hub_dataset_id": "me/new"}, push_to_hub=True, hub_model_id="me/old") == ("me/new", False)
