"""ExpertTrainer and DistillationTrainer on tiny random models (a handful of steps each)."""

import copy

import pytest
import torch

from repblend_hf.configuration import RepBlendConfig
from repblend_hf.distillation import matching_gradients, plan_inner_loop
from repblend_hf.encoders import load_image_encoder
from repblend_hf.features import FeatureSplit
from repblend_hf.synthetic import SyntheticSet
from repblend_hf.trainers import DistillationTrainer, train_experts
from repblend_hf.training_args import DistillationArguments, ExpertTrainingArguments

TEXT_DIM, EMBED, N, SIZE = 8, 8, 10, 32


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return load_image_encoder("test_efficientnet", pretrained=False, image_size=SIZE)


@pytest.fixture(scope="module")
def real(encoder):
    g = torch.Generator().manual_seed(1)
    m, d = 120, encoder.feature_dim
    image = torch.randn(m, d, generator=g)
    mix = torch.randn(d, TEXT_DIM, generator=g) / d**0.5
    text = (image @ mix).repeat_interleave(2, 0) + 0.1 * torch.randn(2 * m, TEXT_DIM, generator=g)
    views = image.unsqueeze(1) + 0.05 * torch.randn(m, 2, d, generator=g)
    return FeatureSplit(image, text, torch.arange(m).repeat_interleave(2), views)


@pytest.fixture(scope="module")
def experts_dir(real, tmp_path_factory):
    out = tmp_path_factory.mktemp("experts")
    args = ExpertTrainingArguments(output_dir=str(out / "run"), num_experts=2, num_train_epochs=3, embed_dim=EMBED,
                                   disable_tqdm=True, logging_steps=1000)
    train_experts(real, args, str(out / "trajectories"))
    return out / "trajectories"


@pytest.fixture(scope="module")
def experts(experts_dir):
    from repblend_hf.trajectories import ExpertTrajectories

    return ExpertTrajectories.load(experts_dir)


def _synthetic(encoder, seed=0, **config):
    torch.manual_seed(seed)  # the low-rank similarity's L is drawn from the global generator
    g = torch.Generator().manual_seed(seed)
    config = {"embed_dim": EMBED, **config}
    cfg = RepBlendConfig(image_encoder="test_efficientnet", image_size=SIZE, image_dim=encoder.feature_dim,
                         text_dim=TEXT_DIM, num_pairs=N, sim_rank=2, **config)
    return SyntheticSet(cfg, torch.randn(N, 3, SIZE, SIZE, generator=g), torch.randn(N, TEXT_DIM, generator=g))


def _args(tmp_path, **kw):
    defaults = dict(output_dir=str(tmp_path / "run"), max_steps=4, mini_batch_size=4, syn_steps=3, logging_steps=1,
                    save_strategy="no", disable_tqdm=True, max_start_epoch=2, lr_img=1.0, lr_txt=1.0, lr_sim=0.1,
                    lr_lr=1e-3, seed=3)
    defaults.update(kw)
    return DistillationArguments(**defaults)


def test_experts_record_every_epoch_and_resume(experts, experts_dir, real, tmp_path):
    assert len(experts) == 2 and experts.num_epochs == 3
    first, last = experts.snapshot(0, 0), experts.snapshot(0, 3)
    assert all(not torch.equal(first[b], last[b]) for b in first)
    assert not torch.equal(experts.snapshot(0, 3)["image"], experts.snapshot(1, 3)["image"])  # seeds differ
    # A third expert is added to the finished two without retraining them.
    args = ExpertTrainingArguments(output_dir=str(tmp_path / "r"), num_experts=3, num_train_epochs=3,
                                   embed_dim=EMBED, disable_tqdm=True)
    mtime = (experts_dir / "expert_000.safetensors").stat().st_mtime_ns
    again = train_experts(real, args, str(experts_dir))
    assert len(again) == 3
    assert (experts_dir / "expert_000.safetensors").stat().st_mtime_ns == mtime
    assert torch.equal(again.snapshot(1, 3)["text"], experts.snapshot(1, 3)["text"])


def test_distillation_changes_the_set_and_logs(encoder, experts, real, tmp_path):
    syn = _synthetic(encoder)
    before = {k: v.detach().clone() for k, v in syn.state_dict().items()}
    trainer = DistillationTrainer(syn, _args(tmp_path, eval_strategy="steps", eval_steps=4, eval_head_epochs=3),
                                  experts, encoder, validation=real)
    trainer.train()
    after = syn.state_dict()
    for name in ("pixel_values", "text_embeddings", "log_lr_img", "similarity.diag", "similarity.right"):
        assert not torch.equal(before[name], after[name]), name
    logged = [h for h in trainer.state.log_history if "matching_loss" in h]
    assert len(logged) == 4 and all(h["nonfinite_skipped"] == 0 for h in logged)
    assert any("eval_r_mean" in h and "eval_val_sim_image" in h for h in trainer.state.log_history)
    # One encoder forward and one backward per distinct touched image per iteration (+ N for the evaluation).
    touched = sum(h["touched_images"] for h in logged)
    assert trainer.encoder_passes == {"forward": touched + N, "backward": touched}
    # The set's config says how it was made (config.json and the card are written from it).
    config = syn.config
    assert (config.method, config.blend_beta, config.matching, config.distill_loss) == ("repblend", 1.0, "symmetric",
                                                                                        "wbce")
    assert (config.syn_steps, config.iterations) == (3, 4)


def test_a_trainer_run_fills_the_card_with_its_hyperparameters_and_curve(encoder, experts, real, tmp_path):
    from repblend_hf.hub import render_synthetic_set_card

    syn = _synthetic(encoder)
    assert "## Training" not in str(render_synthetic_set_card(syn.card_data("user/set")))  # nothing trained yet
    trainer = DistillationTrainer(syn, _args(tmp_path, eval_strategy="steps", eval_steps=2, eval_head_epochs=2,
                                             blend_beta=0.5), experts, encoder, validation=real)
    trainer.train()
    trainer.evaluate()  # after training, at the last step again: its row is replaced, not repeated
    record = syn.training_record
    logged = [h for h in trainer.state.log_history if "eval_r_mean" in h]
    assert [r["step"] for r in record.curve] == [2, 4]
    assert [r["r_mean"] for r in record.curve] == [logged[0]["eval_r_mean"], logged[-1]["eval_r_mean"]]
    assert record.hyperparameters["blend_beta"] == 0.5 and record.hyperparameters["syn_steps"] == 3
    assert (record.hyperparameters["max_steps"], record.hyperparameters["seed"]) == (4, 3)
    assert "output_dir" not in record.hyperparameters  # TrainingArguments' own plumbing stays out
    text = str(render_synthetic_set_card(syn.card_data("user/set")))
    sections = ["## Configuration", "## Training hyperparameters", "## Training curve", "## License"]
    positions = [text.index(s) for s in sections]
    assert positions == sorted(positions)
    assert "| `blend_beta` | 0.5 |" in text and "| `syn_steps` | 3 |" in text and "| `max_steps` | 4 |" in text
    curve = text.split("## Training curve")[1].split("##")[0]
    assert "| step | r_mean | IR@1 |" in curve
    for row in record.curve:
        assert f"| {row['step']} | {row['r_mean']:.2f} | {row['IR@1']:.2f} |" in curve
    assert "| representation blending | λ ~ Beta(β, β), β = 0.5 |" in text  # the config, as before


def test_matching_loss_drops_on_a_fixed_segment(encoder, experts, tmp_path):
    syn = _synthetic(encoder, similarity="none")
    args = _args(tmp_path, max_steps=15, max_start_epoch=1, lr_img=0.3, lr_txt=3.0, blend_beta=0.0,
                 distill_loss="infonce", similarity="none", lr_lr=1e-6)
    trainer = DistillationTrainer(syn, args, experts, encoder)

    def fixed_loss():
        plan = plan_inner_loop(N, 3, 4, 0.0, torch.Generator().manual_seed(0))
        seg = experts.sample_segment(1, 1, torch.Generator().manual_seed(0))
        with torch.no_grad():
            feats = encoder(syn.pixel_values.detach()[plan.touched])
        feats.requires_grad_(True)
        lrs = {b: v.detach() for b, v in syn.inner_lrs().items()}
        return matching_gradients(trainer.heads, feats, syn.text_embeddings.detach()[plan.touched], None, plan,
                                  seg.start_params, seg.target_params, lrs, [feats], temperature=0.07,
                                  distill_loss="infonce")[0].item()

    start = fixed_loss()
    trainer.train()
    end = fixed_loss()
    assert end < start


@pytest.mark.parametrize("meta_gradient", ["tesla", "unrolled"])
@pytest.mark.parametrize(("chunk", "recompute"), [(0, True), (3, True), (3, False)])
def test_pixel_gradient_equals_per_step_encoder(encoder, experts, tmp_path, meta_gradient, chunk, recompute):
    grads, passes = {}, {}
    for per_step in (False, True):
        syn = _synthetic(encoder)
        args = _args(tmp_path, meta_gradient=meta_gradient, encoder_per_step=per_step, encoder_chunk_size=chunk,
                     encoder_recompute=recompute, syn_steps=4, mini_batch_size=5, segments_per_iteration=1)
        trainer = DistillationTrainer(syn, args, experts, encoder)
        trainer.create_optimizer()
        loss = trainer.compute_loss(trainer.model, {"iteration": torch.tensor([0])})
        loss.backward()
        grads[per_step] = {n: p.grad.clone() for n, p in syn.named_parameters()}
        passes[per_step] = dict(trainer.encoder_passes)
    for name, g in grads[False].items():
        assert torch.allclose(g, grads[True][name], rtol=1e-4, atol=1e-6), name
    assert grads[False]["pixel_values"].abs().sum() > 0
    touched = passes[False]["backward"]
    assert touched <= N
    assert passes[False]["forward"] == touched * (2 if chunk and recompute else 1)
    steps_images = 4 * 5
    assert passes[True]["forward"] == steps_images * (2 if meta_gradient == "tesla" else 1)
    assert passes[True]["backward"] == steps_images


def test_several_segments_share_one_encoder_pass_and_average(encoder, experts, tmp_path, monkeypatch):
    import repblend_hf.distillation as module

    calls = []

    def spy(*args, **kwargs):
        out = matching_gradients(*args, **kwargs)
        calls.append((args[4], out))  # (plan, (loss, grads, stats))
        return out

    monkeypatch.setattr(module, "matching_gradients", spy)
    syn = _synthetic(encoder)
    trainer = DistillationTrainer(syn, _args(tmp_path, segments_per_iteration=3, syn_steps=2, mini_batch_size=3),
                                  experts, encoder)
    trainer.create_optimizer()
    trainer.compute_loss(trainer.model, {"iteration": torch.tensor([0])}).backward()
    assert len(calls) == 3
    plans = [plan for plan, _ in calls]
    union = torch.unique(torch.cat([torch.cat(p.batch_indices) for p in plans]))
    assert torch.equal(plans[0].touched, union) and len(union) > len(torch.unique(torch.cat(plans[0].batch_indices)))
    # One encoder forward and backward per distinct image of the union, not per segment.
    assert trainer.encoder_passes == {"forward": len(union), "backward": len(union)}
    logged = trainer._metrics["matching_loss"][-1]
    assert logged == pytest.approx(sum(float(out[0]) for _, out in calls) / 3, rel=1e-6)
    # The text embeddings' gradient is the segments' average, scattered to the touched rows.
    g_text = sum(out[1][1] for _, out in calls) / 3
    torch.testing.assert_close(syn.text_embeddings.grad[union], g_text)


def test_resume_continues_from_checkpoint(encoder, experts, tmp_path):
    def run(out, max_steps, resume=None):
        syn = _synthetic(encoder)
        args = _args(tmp_path, output_dir=str(out), max_steps=max_steps, save_strategy="steps", save_steps=2)
        DistillationTrainer(syn, args, experts, encoder).train(resume_from_checkpoint=resume)
        return syn

    full = run(tmp_path / "full", 4)
    run(tmp_path / "cut", 2)  # a run that stopped after its checkpoint at step 2
    resumed = run(tmp_path / "cut", 4, resume=str(tmp_path / "cut" / "checkpoint-2"))
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), name


def test_trajectory_shapes_must_match_the_heads(encoder, experts, tmp_path):
    syn = _synthetic(encoder)
    syn.config.embed_dim = EMBED * 2
    with pytest.raises(ValueError, match="image"):
        DistillationTrainer(syn, _args(tmp_path), experts, encoder)


def test_non_finite_iteration_is_skipped_not_applied(encoder, experts, tmp_path):
    syn = _synthetic(encoder)
    trainer = DistillationTrainer(syn, _args(tmp_path, max_steps=3, syn_momentum=0.9), experts, encoder)
    real_sample = experts.sample_segment

    def poisoned(*args, **kwargs):  # the second iteration's expert targets hold a NaN
        segment = real_sample(*args, **kwargs)
        if trainer.state.global_step == 1:
            segment.target_params["text"][0] = float("nan")
        return segment

    experts.sample_segment = poisoned
    snapshots = []
    trainer.add_callback(type("Snap", (__import__("transformers").TrainerCallback,), {
        "on_step_end": lambda self, args, state, control, **kw: snapshots.append(
            {k: v.detach().clone() for k, v in syn.state_dict().items()})})())
    try:
        trainer.train()
    finally:
        experts.sample_segment = real_sample
    skipped = [h["nonfinite_skipped"] for h in trainer.state.log_history if "nonfinite_skipped" in h]
    assert skipped == [0.0, 1.0, 0.0]
    # Step 2 changed nothing (no gradient, and momentum was not applied either); step 3 moved on.
    assert all(torch.equal(snapshots[0][k], snapshots[1][k]) for k in snapshots[0])
    assert not torch.equal(snapshots[1]["pixel_values"], snapshots[2]["pixel_values"])
    assert all(torch.isfinite(v).all() for v in syn.state_dict().values())


def test_repeated_non_finite_iterations_lower_the_lrs_then_stop(encoder, experts, tmp_path):
    from repblend_hf.trainers import NonFiniteError

    syn = _synthetic(encoder)
    args = _args(tmp_path, max_steps=20, save_strategy="steps", save_steps=2, nonfinite_patience=2,
                 nonfinite_max_lowerings=1, nonfinite_lr_factor=0.5)
    trainer = DistillationTrainer(syn, args, experts, encoder)
    real_sample = experts.sample_segment
    calls = {"n": 0}

    def poisoned(*a, **kw):  # from iteration 3 on an inf in the image target: an inf loss, every group offends
        segment = real_sample(*a, **kw)
        calls["n"] += 1
        if calls["n"] >= 3:
            segment.target_params["image"][0] = float("inf")
        return segment

    experts.sample_segment = poisoned
    try:
        with pytest.raises(NonFiniteError, match=r"4 consecutive iterations .*lowering their learning rates 1 times"
                                                 r".*checkpoint-4.*--resume_from_checkpoint latest"):
            trainer.train()
    finally:
        experts.sample_segment = real_sample
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs == {"images": 0.5, "texts": 0.5, "similarity": 0.05, "lrs": args.lr_lr * 0.5}  # a NaN loss: every group
    assert trainer.lr_scheduler.get_last_lr() == [0.5, 0.5, 0.05, args.lr_lr * 0.5]  # kept by the constant schedule
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "run" / "checkpoint-4" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())


def test_bf16_runs_the_encoder_in_bf16_and_keeps_the_set_in_fp32(encoder, experts, tmp_path):
    syn = _synthetic(encoder)
    dtypes = []
    # On the wrapper: the trainer calls it, and it runs the BatchNorm-folded copy of encoder.model.
    hook = encoder.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    try:
        trainer = DistillationTrainer(syn, _args(tmp_path, max_steps=2, bf16=True, use_cpu=True), experts, encoder)
        trainer.train()
    finally:
        hook.remove()
    assert dtypes and set(dtypes) == {torch.bfloat16}
    assert all(p.dtype == torch.float32 for p in syn.parameters())
    assert all(p.dtype == torch.float32 for p in trainer.heads.parameters())
    logged = [h for h in trainer.state.log_history if "matching_loss" in h]
    assert len(logged) == 2 and all(h["nonfinite_skipped"] == 0 for h in logged)


@pytest.fixture(scope="module")
def pixel_split(encoder):
    """16 random PIL images with cached (random) features and two captions each, for asymmetric experts."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    m = 16
    images = [Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype("uint8")) for _ in range(m)]
    g = torch.Generator().manual_seed(5)
    split = FeatureSplit(torch.randn(m, encoder.feature_dim, generator=g), torch.randn(2 * m, TEXT_DIM, generator=g),
                         torch.arange(m).repeat_interleave(2))
    return split, images


def _asymmetric_expert_args(out, encoder, image_head=False, **kw):
    return ExpertTrainingArguments(output_dir=str(out), num_experts=1, num_train_epochs=2, matching="asymmetric",
                                   embed_dim=EMBED if image_head else encoder.feature_dim,
                                   asymmetric_image_head=image_head, per_device_train_batch_size=8,
                                   disable_tqdm=True, report_to="none", **kw)


@pytest.fixture(scope="module")
def asymmetric_experts(encoder, pixel_split, tmp_path_factory):
    """One asymmetric expert as the released buffer.py trains it: image encoder and text head, no image head."""
    split, images = pixel_split
    out = tmp_path_factory.mktemp("asymmetric")
    return train_experts(split, _asymmetric_expert_args(out / "e", encoder), str(out / "traj"),
                         image_encoder=encoder, images=images)


def _asymmetric_set(encoder, seed=0, image_head=False, **config):
    """A pixel set built for the asymmetric student (without an image head: embed_dim = the encoder's width)."""
    return _synthetic(encoder, seed, matching="asymmetric", asymmetric_image_head=image_head,
                      embed_dim=EMBED if image_head else encoder.feature_dim, **config)


def test_asymmetric_student_is_the_encoder_and_the_text_head(encoder, pixel_split, asymmetric_experts, tmp_path):
    """The released LoRS / MTT-VL layout: image branch = the encoder's parameters exactly, no image head anywhere."""
    from repblend_hf.inner_loop import _Student
    from repblend_hf.modeling import RetrievalHeads, branch_sizes, flatten_parameters
    from repblend_hf.trainers import ExpertModel

    encoder_size = sum(p.numel() for p in encoder.model.parameters())
    experts = asymmetric_experts
    assert experts.metadata["image_branch"] == "encoder"
    assert experts.branch_sizes["image"] == encoder_size  # nothing after the encoder's parameters
    assert torch.equal(experts.snapshot(0, 0)["image"], flatten_parameters(encoder.model))  # epoch 0 = pretrained
    assert not torch.equal(experts.snapshot(0, 0)["image"], experts.snapshot(0, 2)["image"])  # the encoder trained
    assert not torch.equal(experts.snapshot(0, 0)["text"], experts.snapshot(0, 2)["text"])
    heads = RetrievalHeads(encoder.feature_dim, TEXT_DIM, encoder.feature_dim, image_head=False)
    assert list(heads.image_head.parameters()) == [] and not heads.has_image_head
    assert experts.branch_sizes == branch_sizes(heads, encoder.model)
    # The expert model's parameters are exactly the two matched branches (nothing unused for DDP to trip on).
    model = ExpertModel(heads, 0.07, copy.deepcopy(encoder.model).requires_grad_(True))
    assert sum(p.numel() for p in model.parameters()) == sum(experts.branch_sizes.values())
    model(torch.randn(3, TEXT_DIM), pixel_values=torch.randn(3, 3, SIZE, SIZE))["loss"].backward()
    assert all(p.grad is not None for p in model.parameters())
    # The student splits the image branch into the encoder's tensors only, and the trainer accepts these experts.
    student = _Student(heads, encoder.model, dropout=0.1)
    split = student.split(experts.snapshot(0, 1))
    assert [t.shape for t in split["image"]] == [p.shape for p in encoder.model.parameters()]
    assert [t.shape for t in split["text"]] == [p.shape for p in heads.text_head.parameters()]
    assert student.masks(0, 4, "cpu")[0] is None  # no image head: no dropout on the encoder's feature
    trainer = DistillationTrainer(_asymmetric_set(encoder), _args(tmp_path, method="lors"), experts, encoder)
    assert not trainer.heads.has_image_head and trainer.heads.text_head.fc.out_features == encoder.feature_dim


def test_asymmetric_image_head_is_an_explicit_ablation(encoder, pixel_split, asymmetric_experts, tmp_path):
    from repblend_hf.modeling import RetrievalHeads, branch_sizes

    split, images = pixel_split
    # Without the flag the text head must output the encoder's width: a clear error, before any expert trains.
    args = ExpertTrainingArguments(output_dir=str(tmp_path / "e"), num_experts=1, num_train_epochs=2,
                                   matching="asymmetric", embed_dim=EMBED, disable_tqdm=True)
    with pytest.raises(ValueError, match=f"set embed_dim={encoder.feature_dim} \\(got {EMBED}\\)"):
        train_experts(split, args, str(tmp_path / "bad"), image_encoder=encoder, images=images)
    assert not (tmp_path / "bad").exists()
    with_head = train_experts(split, _asymmetric_expert_args(tmp_path / "e", encoder, image_head=True),
                              str(tmp_path / "head"), image_encoder=encoder, images=images)
    assert with_head.metadata["image_branch"] == "encoder+image_head"
    heads = RetrievalHeads(encoder.feature_dim, TEXT_DIM, EMBED)
    assert with_head.branch_sizes == branch_sizes(heads, encoder.model)
    assert with_head.branch_sizes["image"] > asymmetric_experts.branch_sizes["image"]
    # Experts and student must agree on the layout: each refuses the other's trajectories.
    with pytest.raises(ValueError, match="branch 'image' of the expert trajectories has"):
        DistillationTrainer(_asymmetric_set(encoder), _args(tmp_path, method="lors"), with_head, encoder)
    with pytest.raises(ValueError, match="branch 'image' of the expert trajectories has"):
        DistillationTrainer(_asymmetric_set(encoder, image_head=True),
                            _args(tmp_path, method="lors", asymmetric_image_head=True), asymmetric_experts, encoder)
    trainer = DistillationTrainer(_asymmetric_set(encoder, image_head=True),
                                  _args(tmp_path, method="lors", asymmetric_image_head=True), with_head, encoder)
    assert trainer.heads.has_image_head
    # The set's config must describe the student the arguments build.
    with pytest.raises(ValueError, match="args.asymmetric_image_head=True but the SyntheticSet was built with "
                                         "config.asymmetric_image_head=False"):
        DistillationTrainer(_asymmetric_set(encoder), _args(tmp_path, method="lors", asymmetric_image_head=True),
                            with_head, encoder)
    with pytest.raises(ValueError, match="args.matching='asymmetric' but the SyntheticSet was built with "
                                         "config.matching='symmetric'"):
        DistillationTrainer(_synthetic(encoder), _args(tmp_path, method="lors"), asymmetric_experts, encoder)


def test_asymmetric_experts_and_lors_distillation_run(encoder, pixel_split, asymmetric_experts, tmp_path):
    """LoRS-style: experts fine-tune the image encoder from pixels; the student unrolls encoder + text head."""
    split, images = pixel_split
    args = _asymmetric_expert_args(tmp_path / "e", encoder)
    with pytest.raises(ValueError, match="pass image_encoder= and images="):
        train_experts(split, args, str(tmp_path / "bad"))
    experts = asymmetric_experts

    fresh = load_image_encoder("test_efficientnet", pretrained=False, image_size=SIZE)  # never folded before
    syn = _asymmetric_set(fresh)
    before = syn.pixel_values.detach().clone()
    trainer = DistillationTrainer(syn, _args(tmp_path, method="lors", max_steps=1, max_start_epoch=1), experts,
                                  fresh)
    trainer.train()
    assert fresh.fast_model is None  # LoRS trains the encoder it unrolls: its BatchNorms are never folded
    assert (syn.config.method, syn.config.blend_beta, syn.config.matching, syn.config.iterations) == (
        "lors", 0.0, "asymmetric", 1)  # a LoRS set says what it is
    assert not torch.equal(before, syn.pixel_values)
    assert [h["nonfinite_skipped"] for h in trainer.state.log_history if "nonfinite_skipped" in h] == [0.0]
    # The unrolled encoder's passes are counted: 3 steps × 4 images per segment, run again when TESLA recomputes
    # a step; three backwards per image and step (the step's gradient, and the recomputation's double backward).
    k = trainer.args.segments_per_iteration
    assert trainer.encoder_passes == {"forward": k * 2 * 3 * 4, "backward": k * 3 * 3 * 4}


def test_mtt_vl_inner_logit_scale_is_used_by_the_inner_loop_only(encoder, pixel_split, asymmetric_experts, tmp_path,
                                                                 monkeypatch):
    """MTT-VL's released inner loop multiplies the cosine by ln(1/0.07); its experts and evaluation use 1/0.07."""
    import math

    import repblend_hf.distillation as module
    import repblend_hf.trainers.distillation_trainer as trainer_module
    from repblend_hf.evaluation import train_heads

    seen = {"inner": [], "evaluation": []}

    def inner(*a, **kw):
        seen["inner"].append(kw["temperature"])
        return matching_gradients(*a, **kw)

    def evaluation(pairs, protocol, **kw):
        seen["evaluation"].append(protocol.temperature)
        return train_heads(pairs, protocol, **kw)

    monkeypatch.setattr(module, "matching_gradients", inner)
    monkeypatch.setattr(trainer_module, "train_heads", evaluation)
    split, _ = pixel_split
    args = _args(tmp_path, method="mtt_vl", max_steps=1, max_start_epoch=1, eval_head_epochs=1, syn_steps=2,
                 mini_batch_size=3, segments_per_iteration=1)
    assert args.inner_logit_scale == pytest.approx(math.log(1 / 0.07))
    trainer = DistillationTrainer(_asymmetric_set(encoder, similarity="none"), args, asymmetric_experts, encoder,
                                  validation=split)
    trainer.train()
    trainer.evaluate()
    assert seen["inner"] == [pytest.approx(1 / math.log(1 / 0.07))]
    assert seen["evaluation"] == [0.07]  # evaluation keeps τ, as do the experts:
    assert asymmetric_experts.metadata["temperature"] == 0.07
    # LoRS has no preset scale (τ); an explicit scale is what the inner loop uses.
    lors = DistillationTrainer(_asymmetric_set(encoder), _args(tmp_path, method="lors"), asymmetric_experts, encoder)
    assert lors._inner_temperature == 0.07
    seen["inner"].clear()
    trainer = DistillationTrainer(_asymmetric_set(encoder), _args(tmp_path, method="lors", inner_logit_scale=4.0,
                                                                  segments_per_iteration=1, syn_steps=2,
                                                                  mini_batch_size=3), asymmetric_experts, encoder)
    trainer.create_optimizer()
    trainer.compute_loss(trainer.model, {"iteration": torch.tensor([0])})
    assert seen["inner"] == [0.25]


def test_symmetric_distillation_folds_the_encoder_batchnorms_with_the_same_result(experts, tmp_path):
    sets = {}
    for fold in (False, True):
        encoder = load_image_encoder("test_efficientnet", pretrained=False, image_size=SIZE)
        syn = _synthetic(encoder)
        trainer = DistillationTrainer(syn, _args(tmp_path / str(fold), max_steps=2, fold_batchnorm=fold), experts,
                                      encoder)
        assert (encoder.fast_model is not None) == fold
        trainer.train()
        sets[fold] = syn.pixel_values.detach().clone()
    assert not torch.equal(sets[True], sets[False])  # the folded encoder really ran (float rounding differs)
    torch.testing.assert_close(sets[True], sets[False], rtol=1e-4, atol=1e-5)


def test_an_expert_epoch_is_one_pass_over_the_caption_pairs(real, experts, tmp_path):
    # 120 images with 2 captions each: an epoch is 240 pairs, i.e. 2 steps of 128 (not 1 step over the images).
    from repblend_hf.trainers.expert_trainer import EPOCH_DEFINITION, _FeaturePairs

    pairs = _FeaturePairs(real)
    assert len(pairs) == real.num_captions == 240
    item = pairs[5]  # caption 5 belongs to image 2
    assert torch.equal(item["text_features"], real.caption_features[5])
    assert any(torch.equal(item["image_features"], v) for v in real.augmented_image_features[2])
    assert experts.metadata["epoch_definition"] == EPOCH_DEFINITION
    assert experts.metadata["features_fingerprint"] == real.fingerprint and experts.metadata["seed"] == 42


def test_old_expert_cache_is_refused_with_a_message(real, experts_dir, tmp_path):
    import json
    import shutil

    old = tmp_path / "old_experts"
    shutil.copytree(experts_dir, old)
    meta = json.loads((old / "trajectories.json").read_text())
    del meta["epoch_definition"]  # what repblend_hf < 0.2 wrote
    (old / "trajectories.json").write_text(json.dumps(meta))
    args = ExpertTrainingArguments(output_dir=str(tmp_path / "r"), num_experts=2, num_train_epochs=3,
                                   embed_dim=EMBED, disable_tqdm=True)
    with pytest.raises(ValueError, match="old epoch definition"):
        train_experts(real, args, str(old))


def _feature_set(encoder, seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    cfg = RepBlendConfig(image_encoder="test_efficientnet", image_size=SIZE, image_dim=encoder.feature_dim,
                         text_dim=TEXT_DIM, embed_dim=EMBED, num_pairs=N, sim_rank=2, synthetic_space="features")
    return SyntheticSet(cfg, torch.randn(N, encoder.feature_dim, generator=g), torch.randn(N, TEXT_DIM, generator=g))


def test_feature_space_distillation_learns_features_without_the_encoder(encoder, experts, real, tmp_path):
    from repblend_hf.evaluation import ReferenceDiagnostics
    from repblend_hf.modeling import RetrievalHeads

    syn = _feature_set(encoder)
    assert not hasattr(syn, "pixel_values") and syn.images is syn.image_features
    before = syn.image_features.detach().clone()
    reference = ReferenceDiagnostics(RetrievalHeads(encoder.feature_dim, TEXT_DIM, EMBED))
    reference.real_subset = {"sim_image": 0.1, "sim_text": 0.2, "gap": 0.3}
    trainer = DistillationTrainer(syn, _args(tmp_path, eval_strategy="steps", eval_steps=4, eval_head_epochs=3),
                                  experts, encoder, validation=real, reference=reference)
    trainer.train()
    assert not torch.equal(before, syn.image_features)
    assert trainer.encoder_passes == {"forward": 0, "backward": 0}  # the encoder never runs
    logged = next(h for h in trainer.state.log_history if "eval_set_sim_image" in h)
    assert logged["eval_real_subset_gap"] == 0.3
    assert logged["eval_set_gap"] == pytest.approx(reference(trainer.synthetic_pairs())["gap"])
    # The pairs evaluation trains on are the learned features themselves.
    assert torch.equal(trainer.synthetic_pairs().image_features, syn.image_features.detach())


def test_feature_space_gradient_equals_pixel_path_on_the_same_features(encoder, experts, tmp_path):
    # A feature-space set holding exactly the encoder's features of a pixel set gets the same feature gradient
    # as the pixel path's gradient at the features (before the encoder's backward).
    pixels = _synthetic(encoder)
    with torch.no_grad():
        feats = encoder(pixels.pixel_values)
    syn = _feature_set(encoder)
    with torch.no_grad():
        syn.image_features.copy_(feats)
        syn.text_embeddings.copy_(pixels.text_embeddings)
        for p, q in zip(syn.similarity.parameters(), pixels.similarity.parameters()):
            p.copy_(q)
    grads = {}
    for name, model in (("features", syn), ("pixels", pixels)):
        trainer = DistillationTrainer(model, _args(tmp_path, segments_per_iteration=1), experts, encoder)
        trainer.create_optimizer()
        trainer.compute_loss(trainer.model, {"iteration": torch.tensor([0])}).backward()
        grads[name] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name in ("text_embeddings", "log_lr_img", "similarity.diag"):
        assert torch.allclose(grads["features"][name], grads["pixels"][name], rtol=1e-3, atol=1e-6), name
    assert grads["features"]["image_features"].abs().sum() > 0


def test_mixed_optimizer_is_torch_sgd_and_torch_adam_per_group():
    from repblend_hf.trainers.distillation_trainer import SGDWithAdamGroups

    torch.manual_seed(0)
    a, b = torch.randn(5, requires_grad=True), torch.randn(3, requires_grad=True)
    a2, b2 = a.detach().clone().requires_grad_(True), b.detach().clone().requires_grad_(True)
    mixed = SGDWithAdamGroups([{"params": [a], "lr": 0.1, "adam": True}, {"params": [b], "lr": 0.5}], lr=0.1,
                              momentum=0.5)
    sgd = torch.optim.SGD([b2], lr=0.5, momentum=0.5)
    adam = torch.optim.Adam([a2], lr=0.1)
    for _ in range(4):
        grads = torch.randn(5), torch.randn(3)
        for x, y in ((a, b), (a2, b2)):
            x.grad, y.grad = grads[0].clone(), grads[1].clone()
        mixed.step()
        sgd.step()
        adam.step()
    assert torch.allclose(a, a2, atol=1e-6) and torch.allclose(b, b2, atol=1e-6)


def test_feature_range_projection_keeps_features_in_the_box(encoder, experts, tmp_path):
    syn = _feature_set(encoder)
    low, high = torch.full((encoder.feature_dim,), -0.05), torch.full((encoder.feature_dim,), 0.05)
    trainer = DistillationTrainer(syn, _args(tmp_path, lr_img=100.0), experts, encoder, feature_bounds=(low, high))
    trainer.train()
    feats = syn.image_features.detach()
    assert feats.min() >= -0.05 and feats.max() <= 0.05
    assert (feats.abs() == 0.05).any()  # the box was active, so the projection did something
    with pytest.raises(ValueError, match="feature-space"):
        DistillationTrainer(_synthetic(encoder), _args(tmp_path), experts, encoder, feature_bounds=(low, high))


def test_logged_metrics_are_averaged_over_the_processes(encoder, experts, tmp_path, monkeypatch):
    """Under DDP the iteration metrics of every process are logged, not rank 0's alone (the mean of the processes)."""
    trainer = DistillationTrainer(_synthetic(encoder), _args(tmp_path), experts, encoder)
    trainer._metrics["matching_loss"] += [1.0, 3.0]
    trainer._metrics["touched_images"] += [8.0]
    assert trainer._averaged_metrics() == {"matching_loss": 2.0, "touched_images": 8.0}  # one process: as recorded
    gathered = []

    def gather(tensor):  # a second process that saw twice these values
        gathered.append(tensor)
        return torch.cat([tensor, 2 * tensor])

    monkeypatch.setattr(type(trainer.args), "world_size", property(lambda self: 2))
    monkeypatch.setattr(trainer.accelerator, "gather", gather)
    trainer.log({"loss": 0.5})
    logged = trainer.state.log_history[-1]
    assert (logged["matching_loss"], logged["touched_images"]) == (3.0, 12.0) and len(gathered) == 1
    assert not trainer._metrics


def test_time_budget_stops_the_run_and_a_resumed_run_continues_it(encoder, experts, tmp_path, monkeypatch):
    """Each step takes 0.25 s on a fake clock; a 1.2 s budget ends the run after 5 of its 50 steps."""
    from repblend_hf.trainers import callbacks

    ticks = iter(range(10**6))
    monkeypatch.setattr(callbacks, "_clock", lambda: 0.25 * next(ticks))  # a step's begin and end: 0.25 s apart
    out = tmp_path / "budget"

    def run(resume=None):
        args = _args(tmp_path, output_dir=str(out), max_steps=50, save_strategy="steps", save_steps=1,
                     max_time_minutes=0.02)
        trainer = DistillationTrainer(_synthetic(encoder), args, experts, encoder)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    # (the 0.25 s from one step's end to the next one's begin are not counted)
    first = run()
    assert first.state.global_step == 5 and (out / "checkpoint-5").is_dir()
    resumed = run(resume=str(out / "checkpoint-5"))
    assert resumed.state.global_step == 6  # 1.25 s were spent before: one more step, not another five
    with pytest.raises(ValueError, match="max_time_minutes must be > 0"):
        _args(tmp_path, max_time_minutes=0)


def test_a_run_stopped_by_its_time_budget_continues_to_max_steps_as_the_run_from_scratch(encoder, experts, real,
                                                                                         tmp_path, monkeypatch):
    """benchmarks' --continue_from: the equal-iteration run resumes the equal-time run's last checkpoint (taken when
    its budget stopped it, after the evaluation there) and ends with the set a run of max_steps from scratch makes."""
    from repblend_hf.trainers import callbacks

    ticks = iter(range(10**6))
    monkeypatch.setattr(callbacks, "_clock", lambda: 0.25 * next(ticks))

    def run(out, max_steps, minutes=None, resume=None):
        syn = _synthetic(encoder)
        args = _args(tmp_path, output_dir=str(out), max_steps=max_steps, save_strategy="steps", save_steps=2,
                     max_time_minutes=minutes, eval_strategy="steps", eval_steps=2, eval_head_epochs=1)
        trainer = DistillationTrainer(syn, args, experts, encoder, validation=real)
        trainer.train(resume_from_checkpoint=resume)
        return syn, trainer.state.log_history

    scratch, _ = run(tmp_path / "scratch", 5)
    _, history = run(tmp_path / "timed", 50, minutes=0.0125)  # 0.75 s: stops after 3 of 50 steps, checkpoint-3
    assert [h["step"] for h in history if "eval_r_mean" in h] == [2, 3]  # evaluated where the budget stopped it
    continued, _ = run(tmp_path / "timed", 5, resume=str(tmp_path / "timed" / "checkpoint-3"))
    for (name, a), (_, b) in zip(scratch.state_dict().items(), continued.state_dict().items()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=name)


def test_lors_pixel_gradient_is_the_same_through_the_grouped_convolutions(encoder, asymmetric_experts, tmp_path,
                                                                           monkeypatch):
    """The asymmetric student runs the encoder's grouped convolutions through grouped_conv2d (whose double backward
    has no per-group loop): the same meta-gradient as ATen's own double backward."""
    import contextlib

    import repblend_hf.grouped_conv as grouped
    import repblend_hf.inner_loop as module

    groups, original = [], grouped.grouped_conv2d
    monkeypatch.setattr(grouped, "grouped_conv2d", lambda *a: groups.append(a[-1]) or original(*a))
    grads = {}
    for routed in (True, False):
        if not routed:
            routed_calls = len(groups)
            monkeypatch.setattr(module, "grouped_conv_double_backward", contextlib.nullcontext)
        syn = _asymmetric_set(encoder)
        trainer = DistillationTrainer(syn, _args(tmp_path, method="lors", syn_steps=2, mini_batch_size=3,
                                                 segments_per_iteration=1), asymmetric_experts, encoder)
        trainer.create_optimizer()
        trainer.compute_loss(trainer.model, {"iteration": torch.tensor([0])}).backward()
        grads[routed] = {n: p.grad.clone() for n, p in syn.named_parameters() if p.grad is not None}
    assert routed_calls > 0 and min(groups) > 1 and len(groups) == routed_calls  # grouped ones, only when routed
    assert grads[True].keys() == grads[False].keys() and grads[True]["pixel_values"].abs().sum() > 0
    for name, g in grads[True].items():  # the same CPU kernels: equal to rounding (here bit-identical)
        ref = grads[False][name]
        torch.testing.assert_close(g, ref, rtol=0, atol=1e-7 * float(ref.abs().max()))


def test_runs_sharing_a_trajectory_directory_train_different_experts_and_none_twice(tmp_path):
    import threading

    from accelerate import PartialState
    from filelock import FileLock

    from repblend_hf.trainers.expert_trainer import _claimed

    # Another run holds expert 0: this one trains the free experts first, then finds 0 finished and skips it.
    other = FileLock(tmp_path / ".expert_000.lock", thread_local=False)
    other.acquire()
    safety = threading.Timer(20, other.release)  # a wrong order fails below instead of waiting forever
    safety.start()
    order = []
    for e in _claimed(tmp_path, [0, 1, 2], PartialState()):
        order.append(e)
        if e == 2:  # the other run finishes expert 0 meanwhile
            (tmp_path / "expert_000.safetensors").touch()
            other.release()
    safety.cancel()
    assert order == [1, 2]
    # An expert whose run stopped without finishing it is trained once its lock is free.
    other = FileLock(tmp_path / ".expert_003.lock", thread_local=False)
    other.acquire()
    safety = threading.Timer(20, other.release)
    safety.start()
    order = []
    for e in _claimed(tmp_path, [3, 4], PartialState()):
        order.append(e)
        if e == 4:
            other.release()
    safety.cancel()
    assert order == [4, 3]
    for e in range(5):  # every lock is free again
        FileLock(tmp_path / f".expert_{e:03d}.lock").acquire(blocking=False)
