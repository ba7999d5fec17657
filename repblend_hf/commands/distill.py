"""``repblend-distill``: distil an image-text dataset into a few synthetic pairs with RepBlend (or LoRS / MTT-VL).

    repblend-distill                                                   # embedded default, offline
    repblend-distill --config examples/configs/flickr30k_100.yaml
    repblend-distill --max_steps 200 --output_dir outputs/quick
    repblend-distill --resume_from_checkpoint latest                   # after an interruption
    repblend-distill --hub_dataset_id you/fashion-scenes-repblend-99   # push the set to a Hub dataset repo
    accelerate launch -m repblend_hf.commands.distill --max_steps 200  # the same under accelerate
    accelerate launch examples/distill.py --max_steps 200              # the example script on top of this

Stages (DESIGN.md, "Data flow"): load the dataset, encode every split once with the frozen encoders
(cached by ``datasets``), train the expert trajectories (kept on disk and reused; an interrupted run
keeps its finished experts), distil with :class:`DistillationTrainer` (checkpoints every
``save_steps``), then evaluate the distilled set beside the random coreset and full data on the test
split, save the set (config.json + Parquet rows) and draw its pictures. With no ``--config`` the
embedded default's settings (``repblend_hf/configs/fashion_scenes_99.yaml``, also
``examples/configs/fashion_scenes_99.yaml``) are used.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
import platform
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import PartialState
from transformers import HfArgumentParser

from ..checks import check_distill_data, check_distill_run
from ..configuration import RepBlendConfig
from ..evaluation import EvaluationProtocol, evaluate_pairs
from ..pipeline import (
    DataArguments,
    evaluate_baseline,
    evaluate_finetuned_set,
    format_table,
    last_complete_checkpoint,
    own_protocol_record,
    parse_with_config,
    prepare_features,
    reference_diagnostics,
    results_record,
    shared_reference_cache,
    write_results,
)
from ..plotting import plot_similarity, plot_synthetic_grid, plot_training_curves
from ..stages import (
    Stage,
    as_first_stages,
    grow_synthetic_set,
    plan_stages,
    similarity_from_expert,
    stage_config,
    stage_epochs,
    stage_time_budgets,
)
from ..synthetic import SyntheticSet
from ..trainers import DistillationTrainer, stage_targets, train_experts
from ..training_args import DistillationArguments, ExpertTrainingArguments

__all__ = ["DEFAULT_CONFIG", "SetArguments", "cli", "distill", "hub_dataset_repo", "main"]

# The embedded default's settings, shipped in the wheel (examples/configs/fashion_scenes_99.yaml links here).
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "fashion_scenes_99.yaml"
logger = logging.getLogger("distill")


@dataclass
class SetArguments:
    """What the distilled set is (becomes its RepBlendConfig), how experts and evaluation run, where it is pushed."""

    num_pairs: int = field(default=99, metadata={"help": "Synthetic pairs N (the paper's '100 pairs' is 99 + S)."})
    embed_dim: int = field(default=512, metadata={"help": "Projection head dimension (paper: 2304)."})
    temperature: float = field(default=0.07, metadata={"help": "τ of the cosine logits."})
    sim_rank: int = field(default=10, metadata={"help": "Rank r of the low-rank similarity."})
    sim_alpha: float = field(default=3.0, metadata={"help": "Scale α of the low-rank similarity."})
    synthetic_space: str = field(default="pixels", metadata={
        "help": "'pixels': the set's images are pixels (the paper). 'features': they are vectors of the frozen image "
                "encoder's feature space (minutes instead of tens of minutes on a CPU; the set trains heads on that "
                "same encoder only)."})
    feature_range: str = field(default="free", metadata={
        "help": "Feature space only: 'free' lets the features take any value (the best set for heads on this frozen "
                "encoder); 'real' projects them after every step into the per-dimension range of the real training "
                "features, which any image's features lie in (an upper bound the pixel path can approach)."})
    init_transform: str = field(default="train", metadata={
        "help": "How the real images that initialise the set are prepared: 'train' (one random augmented view, as the "
                "released code's training set gives them) or 'eval' (resized only)."})
    stage_pairs: list[int] | None = field(default=None, metadata={
        "help": "Distil the set in stages of these many new pairs (adding up to num_pairs), e.g. 99 100 for 199 "
                "pairs: each stage learns its own η and matches its own targets (--stage_targets, "
                "--stage_min_start_epoch, --stage_max_start_epoch, --shortcut_epoch); evaluation trains on the "
                "stages in order (PDD, PTM-ST; repblend_hf.stages). Default: one stage."})
    initial_stages: str | None = field(default=None, metadata={
        "help": "Grow a saved distilled set (a folder or a Hub dataset repo id): its pairs are this run's first "
                "stages, kept as they are, and only the later stages are distilled, e.g. a 99-pair set with "
                "--num_pairs 199 --stage_pairs 99 100. It must be made with this run's encoders, space, heads and "
                "similarity."})
    num_experts: int = field(default=8, metadata={"help": "Expert trajectories (paper: 20)."})
    expert_train_epochs: int | None = field(default=None, metadata={
        "help": "Epochs per expert (paper: 10). An epoch is one pass over the (image, caption) pairs. Default: "
                "max_start_epoch - 1 + expert_epochs, the last epoch distillation samples (later ones are never "
                "used; with stages, the latest of the stages that match these experts, or the shortcut's epoch); set "
                "it to share experts between runs with other segments."})
    expert_learning_rate: float = field(default=0.1, metadata={"help": "Experts' SGD learning rate (paper: 0.1)."})
    expert_batch_size: int = field(default=128, metadata={"help": "Experts' batch size (paper: 128)."})
    expert_seed: int = field(default=0, metadata={
        "help": "Seed of the experts (expert e uses expert_seed + e). Separate from --seed, so that distillations "
                "with other seeds reuse the same experts, as the paper's buffers are reused."})
    trajectory_dir: str | None = field(default=None, metadata={
        "help": "Where the experts live (default OUTPUT_DIR/experts); finished experts there are reused."})
    eval_seeds: int = field(default=3, metadata={"help": "Seeds of the final evaluation."})
    full_data_seeds: int = field(default=1, metadata={
        "help": "Seeds of the full-data baseline (heads trained on all training pairs; its seed 0 is also the "
                "reference model of the set diagnostics). One by default: it is a reference, not the product, and a "
                "seed of 1280-d heads takes about 2 minutes on 2 CPU cores (benchmarks/results/first_run.md); "
                "benchmarks/methods.py measures it over 3 seeds."})
    baselines: str = field(default="random,full", metadata={
        "help": "Comma-separated baselines evaluated beside the set: random, herding, kcenter, full ('' for none)."})
    hub_dataset_id: str | None = field(default=None, metadata={
        "help": "Push the distilled set at the end (main process only) to this Hub *dataset* repo, e.g. "
                "you/fashion-scenes-repblend-99 (token: --hub_token, HF_TOKEN or a login; --hub_private_repo true "
                "for a private repo). Replaces --push_to_hub / --hub_model_id, the Trainer's model-repo options, "
                "which still work with a deprecation warning."})

    def __post_init__(self):
        for name, allowed in (("synthetic_space", ("pixels", "features")), ("init_transform", ("train", "eval")),
                              ("feature_range", ("free", "real"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"--{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.feature_range == "real" and self.synthetic_space != "features":
            raise ValueError("--feature_range real projects feature-space sets; add --synthetic_space features")


def hub_dataset_repo(set_args: SetArguments, args: DistillationArguments) -> str | None:
    """The dataset repo the distilled set is pushed to: ``--hub_dataset_id``, or the deprecated spelling.

    ``--push_to_hub`` (with ``--hub_model_id REPO``, or the output folder's name) used to name it; those are the
    Trainer's options for a *model* repo of checkpoints. They still push the set, with a ``FutureWarning``. The
    Trainer's own push of checkpoints is switched off either way (``args.push_to_hub`` becomes False).
    """
    repo = set_args.hub_dataset_id
    if args.push_to_hub:
        old = args.hub_model_id or Path(args.output_dir).name
        message = (f"--push_to_hub / --hub_model_id for the distilled set are deprecated (they are the Trainer's "
                   f"model-repo options): use --hub_dataset_id {repo or old}")
        warnings.warn(message, FutureWarning, stacklevel=2)
        repo = repo or old
    args.push_to_hub = False
    return repo


def distill(data_args: DataArguments, set_args: SetArguments, args: DistillationArguments) -> dict:
    """Run every stage (module docstring); returns ``{"records": [...], "timings": {...}}`` on the main process."""
    if set_args.expert_train_epochs is None:  # only the epochs the segments of the experts' stages can reach
        try:
            planned = run_stages(set_args, args)
            set_args.expert_train_epochs = max(stage_epochs(st, args.expert_epochs) for st in planned
                                               if st.index == 0 or args.stage_targets == "experts")
        except ValueError:  # stages that cannot be planned: check_distill_run says why
            set_args.expert_train_epochs = args.max_start_epoch - 1 + args.expert_epochs
    check_distill_run(data_args, set_args, args)  # everything that can fail is judged before the long work
    stages = run_stages(set_args, args)  # one stage unless --stage_pairs
    out = Path(args.output_dir)
    push_repo = hub_dataset_repo(set_args, args)  # pushed at the end, from the main process only
    started = time.time()
    state = PartialState()
    with state.main_process_first():  # the main process encodes; the others then read the datasets cache
        prepared = prepare_features(data_args, with_captions=True,
                                    validate=lambda ds: check_distill_data(ds, set_args))  # before encoding
    train, validation, test = (prepared.features[s] for s in ("train", "validation", "test"))
    features_seconds = time.time() - started
    logger.info("features ready in %.1fs: %d train images, %d captions", time.time() - started, train.num_images,
                train.num_captions)

    # What the set is: the one place the flags become its config (the experts, the trainer, the evaluation and
    # the card read it from here on).
    config = RepBlendConfig(
        image_encoder=data_args.image_encoder, text_encoder=data_args.text_encoder,
        text_pooling=prepared.text_encoder.pooling, image_size=data_args.image_size,
        image_dim=prepared.image_encoder.feature_dim, text_dim=prepared.text_encoder.feature_dim,
        embed_dim=set_args.embed_dim, num_pairs=set_args.num_pairs, temperature=set_args.temperature,
        similarity=args.similarity, sim_rank=set_args.sim_rank, sim_alpha=set_args.sim_alpha, method=args.method,
        inner_lr_img=args.lr_init, inner_lr_txt=args.lr_init, source_dataset=data_args.dataset,
        synthetic_space=set_args.synthetic_space, matching=args.matching,
        asymmetric_image_head=args.asymmetric_image_head)

    # Expert trajectories for the student the set is distilled for, reused from disk when already complete.
    t0 = time.time()
    expert_args = ExpertTrainingArguments(
        output_dir=str(out / "expert_runs"), num_experts=set_args.num_experts,
        num_train_epochs=set_args.expert_train_epochs, learning_rate=set_args.expert_learning_rate,
        per_device_train_batch_size=set_args.expert_batch_size, embed_dim=config.embed_dim,
        temperature=config.temperature, matching=config.matching, seed=set_args.expert_seed,
        asymmetric_image_head=config.asymmetric_image_head, disable_tqdm=args.disable_tqdm,
        use_cpu=args.use_cpu, bf16=args.bf16, fp16=args.fp16, report_to="none")  # one mixed precision per process
    trajectories = train_experts(
        train, expert_args, set_args.trajectory_dir or str(out / "experts"),
        image_encoder=prepared.image_encoder, images=prepared.dataset["train"]["image"]
        if config.matching == "asymmetric" else None,
        metadata={"dataset": data_args.dataset, "image_encoder": data_args.image_encoder,
                  "text_encoder": data_args.text_encoder, "image_size": data_args.image_size})
    experts_seconds = time.time() - t0

    init_features = None
    if set_args.synthetic_space == "features":
        views = train.augmented_image_features
        init_features = views if set_args.init_transform == "train" and views is not None else train.image_features

    def initial_set(stage_config: RepBlendConfig) -> SyntheticSet:  # random real pairs, drawn from --seed
        return SyntheticSet.from_real(stage_config, prepared.dataset["train"]["image"], train.caption_features,
                                      train.caption_offsets(), prepared.image_encoder, seed=args.seed,
                                      init_transform=set_args.init_transform, image_features=init_features)

    # The full-data baseline does not depend on the set: it runs now, and its seed 0's final heads are the reference
    # model of the set-level diagnostics (the same training as reference_diagnostics would run a second time).
    t0, full, finals = time.time(), None, {}
    if "full" in set_args.baselines.split(",") and state.is_main_process:
        full = evaluate_baseline("full", prepared.features, train.num_images, embed_dim=config.embed_dim,
                                 seeds=list(range(set_args.full_data_seeds)), temperature=config.temperature,
                                 on_trained=lambda seed, trained: finals.setdefault(seed, trained.final_state))
    full_seconds = time.time() - t0
    reference = reference_diagnostics(prepared.features, config.num_pairs, embed_dim=config.embed_dim,
                                      temperature=config.temperature, cache_dir=out, trained_state=finals.get(0),
                                      shared_cache_dir=shared_reference_cache())
    bounds = None
    if set_args.synthetic_space == "features" and set_args.feature_range == "real":
        bounds = (train.image_features.min(0).values, train.image_features.max(0).values)

    # Distillation, stage by stage (one stage unless --stage_pairs): each stage's set grows from the previous one.
    previous, distill_seconds, resumed_from, iterations = None, 0.0, 0, 0
    if set_args.initial_stages:
        previous = as_first_stages(SyntheticSet.load(set_args.initial_stages), config, stages,
                                   set_args.initial_stages)
    # --max_time_minutes is the whole run's: each stage distilled here gets its share (by its iterations).
    budgets = stage_time_budgets(stages, args.max_time_minutes, previous.num_pairs if previous is not None else 0)
    for stage, budget in zip(stages, budgets):
        staged = len(stages) > 1
        stage_dir = out / f"stage_{stage.index + 1}" if staged else out
        finished = stage_dir / "synthetic_set"
        if previous is not None and stage.end <= previous.num_pairs:
            continue  # one of the --initial_stages
        if staged and stage is not stages[-1] and (finished / "config.json").is_file():
            previous = SyntheticSet.from_pretrained(finished)  # done in an earlier run: its set is all that is needed
            iterations += previous.config.stages[-1]["iterations"]
            resumed_from += previous.config.stages[-1]["iterations"]
            continue
        t0 = time.time()
        stage_trajectories = stage_targets(stage, config, trajectories, previous, train, prepared.image_encoder,
                                           expert_args, args, stage_dir)
        experts_seconds += time.time() - t0
        synthetic = initial_set(stage_config(config, stage, args, previous) if staged else config)
        if args.similarity_init == "expert" and previous is None:  # the first stage's S from the late experts
            epoch = trajectories.num_epochs if args.similarity_init_epoch is None else args.similarity_init_epoch
            synthetic.similarity.initialise_(similarity_from_expert(
                synthetic.pair_set(prepared.image_encoder), trajectories, epoch, synthetic.config))
        if previous is not None:
            grow_synthetic_set(previous, synthetic)
        stage_args = (dataclasses.replace(args, output_dir=str(stage_dir), max_steps=stage.max_steps,
                                          max_time_minutes=budget) if staged else args)
        trainer = DistillationTrainer(synthetic, stage_args, stage_trajectories, prepared.image_encoder,
                                      validation=validation, reference=reference, feature_bounds=bounds,
                                      stage=stage)
        resume = args.resume_from_checkpoint
        if resume == "latest":
            resume = last_complete_checkpoint(stage_dir)
            logger.info("resuming from %s", resume or "scratch (no checkpoint yet)")
        # Iterations done before this process started: distillation_s covers only the ones after them.
        resumed_state = Path(resume) / "trainer_state.json" if isinstance(resume, str) else None
        if resumed_state is not None and resumed_state.is_file():
            resumed_from += json.loads(resumed_state.read_text())["global_step"]
        t0 = time.time()
        trainer.train(resume_from_checkpoint=resume)
        distill_seconds += time.time() - t0
        iterations += trainer.state.global_step
        if staged:
            synthetic.config.stages[-1]["iterations"] = trainer.state.global_step
        if staged and stage is not stages[-1]:
            if trainer.is_world_process_zero():
                synthetic.save_pretrained(finished)  # the next stage grows from it; a resumed run starts there
            trainer.accelerator.wait_for_everyone()
            previous = synthetic
    checksums = trainer.replica_checksums()
    if len(set(checksums)) > 1:
        raise RuntimeError(f"the synthetic set differs between processes after training ({checksums}); "
                           "please report this with the command you ran")
    summary = {}
    if trainer.is_world_process_zero():
        summary = _finish(trainer, prepared, data_args, set_args, args, synthetic.config, synthetic, push_repo, full, {
            "features_s": round(features_seconds, 1), **prepared.seconds, "experts_s": round(experts_seconds, 1),
            "full_data_baseline_s": round(full_seconds, 1),
            "distillation_s": round(distill_seconds, 1), "resumed_from_iteration": resumed_from,
            "stage_iterations": iterations if len(stages) > 1 else None,
            "processes": state.num_processes,
            "replica_checksums": checksums, "machine": machine()}, started)
    # A clean end for every process (without it about 1 multi-process launch in 10 aborts at exit).
    accelerator = trainer.accelerator
    del trainer
    accelerator.free_memory()
    gc.collect()
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def run_stages(set_args: SetArguments, args: DistillationArguments) -> list[Stage]:
    """The stages of a run (:func:`~repblend_hf.stages.plan_stages` of its arguments): one unless --stage_pairs."""
    return plan_stages(set_args.num_pairs, set_args.stage_pairs, max_steps=args.max_steps,
                       max_start_epoch=args.max_start_epoch, stage_steps=args.stage_steps,
                       stage_min_start_epoch=args.stage_min_start_epoch,
                       stage_max_start_epoch=args.stage_max_start_epoch, shortcut_epoch=args.shortcut_epoch)


def machine() -> dict:
    """What ran this process, for ``timings.json``: the CPU model (``/proc/cpuinfo``, else ``platform``), its
    logical cores, the instruction set torch's CPU kernels use (``AVX2``, ``AVX512``; virtual machines often name
    the model only "Intel(R) Xeon(R) Processor"), torch's intra-op threads and the accelerator, if any. Seconds
    per iteration mean little without it: the same run takes 15 s an iteration on one x86 server, 30 s on another."""
    cpu = ""
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), "")
    except OSError:
        pass
    return {"cpu": cpu or platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "torch_threads": torch.get_num_threads(),
            "accelerator": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def _finish(trainer, prepared, data_args, set_args, args, config, synthetic, push_repo, full, timings,
            started) -> dict:
    """Main process: the test table beside the baselines, the saved set, its pictures and the optional push."""
    out = Path(args.output_dir)
    train, validation, test = (prepared.features[s] for s in ("train", "validation", "test"))

    # Final evaluation on the test split, beside the baselines.
    stage = time.time()
    seeds = list(range(set_args.eval_seeds))
    pairs = trainer.synthetic_pairs()
    protocol = EvaluationProtocol(loss=args.distill_loss, temperature=config.temperature)
    result = evaluate_pairs(pairs, validation, test, protocol, seeds=seeds, embed_dim=config.embed_dim)
    records = [results_record(result, dataset=data_args.dataset, method=args.method, pairs=config.num_pairs)]
    records[0]["set_diagnostics"] = trainer.reference(pairs)  # modality collapse on the pairs themselves
    # ... and the random real subset of the same size it is read against (also when no random baseline runs)
    records[0]["real_subset_diagnostics"] = trainer.reference.real_subset
    records[0]["settings"]["synthetic_space"] = config.synthetic_space
    records[0]["settings"]["text_encode_dtype"] = str(prepared.text_encoder.compute_dtype).removeprefix("torch.")
    if config.synthetic_space == "features":
        records[0]["settings"]["feature_range"] = set_args.feature_range
    records[0]["settings"].update(matching=config.matching, asymmetric_image_head=config.asymmetric_image_head,
                                  inner_logit_scale=args.inner_logit_scale)
    if config.matching == "asymmetric" and config.synthetic_space == "pixels":
        # LoRS / MTT-VL under their own protocol (the image encoder fine-tuned on the pixels at the learned η), with
        # the shared frozen-encoder record kept inside it so that every method stays comparable (issue #11).
        own = evaluate_finetuned_set(trainer.synthetic_pixel_pairs(), prepared, config, seeds=seeds,
                                     loss=args.distill_loss, device=args.device)
        records[0] = own_protocol_record(records[0], own)
    timings["final_evaluation_s"] = round(time.time() - stage, 1)
    stage = time.time()
    for name in filter(None, set_args.baselines.split(",")):
        n = train.num_images if name == "full" else config.num_pairs
        baseline = full if name == "full" and full is not None else evaluate_baseline(
            name, prepared.features, n, embed_dim=config.embed_dim, seeds=seeds, temperature=config.temperature)
        records.append(results_record(baseline, dataset=data_args.dataset, method=name, pairs=n))
        if name != "full":
            records[-1]["set_diagnostics"] = trainer.reference.real_subset if name == "random" else None
    timings["baselines_s"] = round(time.time() - stage, 1)
    stage = time.time()
    write_results(out / "results.json", records[0])
    write_results(out / "baselines.json", {"baselines": records[1:]})
    table = format_table(records)
    (out / "results.md").write_text(table + "\n")

    # The distilled set, with the nearest real caption of each synthetic text embedding as a readable hint.
    text = torch.nn.functional.normalize(synthetic.text_embeddings.detach(), dim=-1)
    real = torch.nn.functional.normalize(train.caption_features, dim=-1)
    nearest = [train.captions[int(i)] for i in (text @ real.t()).argmax(1)]
    enc = prepared.image_encoder
    if config.synthetic_space == "features":
        # Feature vectors have no picture: show each one's nearest real training image instead (a hint).
        feats = torch.nn.functional.normalize(synthetic.images.detach(), dim=-1)
        closest = (feats @ torch.nn.functional.normalize(train.image_features, dim=-1).t()).argmax(1).tolist()
        previews = [prepared.dataset["train"][i]["image"].convert("RGB") for i in closest]
        synthetic.save_pretrained(out / "synthetic_set", nearest_captions=nearest, previews=previews)
        grid = torch.stack([enc.eval_transform(img) for img in previews])
        plot_synthetic_grid(grid, enc.mean, enc.std, out / "synthetic_images.png", captions=nearest,
                            title="Nearest real image of each synthetic feature vector, with its nearest caption")
    else:
        previews = None
        synthetic.save_pretrained(out / "synthetic_set", mean=enc.mean, std=enc.std, nearest_captions=nearest)
        plot_synthetic_grid(synthetic.images.detach(), enc.mean, enc.std, out / "synthetic_images.png",
                            captions=nearest)
    plot_similarity(synthetic.similarity().detach(), out / "similarity.png")
    plot_training_curves(trainer.state.log_history, out / "training_curves.png")
    trainer.state.save_to_json(str(out / "trainer_state.json"))  # the log history behind the curves
    timings["set_and_pictures_s"] = round(time.time() - stage, 1)
    if push_repo is not None:
        commit = synthetic.push_to_hub(push_repo, token=args.hub_token, private=bool(args.hub_private_repo),
                                       mean=enc.mean, std=enc.std, nearest_captions=nearest, results=records,
                                       previews=previews,
                                       grid_image=out / "synthetic_images.png")
        logger.info("pushed the distilled set to %s (revision %s)", push_repo, commit.oid)
    # A set distilled in stages: its iterations are those of every stage (the trainer saw the last one's alone).
    iterations = timings.pop("stage_iterations", None) or trainer.state.global_step
    timings = {**timings, "total_s": round(time.time() - started, 1), "iterations": iterations,
               "encoder_passes": trainer.encoder_passes}
    (out / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    print(table)
    print(f"timings: {timings}")
    print(f"outputs in {out}")
    return {"records": records, "timings": timings}


def main(argv: list[str] | None = None) -> dict:
    """Parse ``argv`` (default ``sys.argv[1:]``; ``--config FILE`` under the command line) and :func:`distill`."""
    parser = HfArgumentParser((DataArguments, SetArguments, DistillationArguments))
    data_args, set_args, args = parse_with_config(parser, argv, DEFAULT_CONFIG)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    return distill(data_args, set_args, args)


def cli() -> None:
    """The ``repblend-distill`` console script: :func:`main` on ``sys.argv``, exit status 0 when it returns."""
    main(sys.argv[1:])


if __name__ == "__main__":
    cli()
