"""Issue #12, "No silent wrong results": one case per probe. Each ends in a correct result or a clear error.

Sections follow the issue's items: 1 finiteness, 2 the metric and an end-to-end test that fails when the
pipeline is broken, 3 caches, 4 lost work, 5 validation before the long work, 6 loading, 7 artefacts.
Tiny random models throughout (tests/conftest.py); nothing here launches a script except the one slow case.
"""

import importlib
import io
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage

from repblend_hf import RepBlendConfig, SyntheticSet
from repblend_hf.checkpoints import check_output_dir, check_resume
from repblend_hf.encoders import load_image_encoder, load_text_encoder
from repblend_hf.evaluation import PairSet
from repblend_hf.pipeline import DataArguments, last_complete_checkpoint, prepare_features
from repblend_hf.training_args import DistillationArguments, ExpertTrainingArguments

ROOT = Path(__file__).resolve().parents[1]


def _example(name):
    """The command behind examples/<name>.py: the module ``repblend_hf.commands.<name>``."""
    return importlib.import_module(f"repblend_hf.commands.{name}")


def _data_args(karpathy_dir, text_dir, **kw):
    # test_convnext: its random features keep the images' colours apart (test_efficientnet's are ~1e-3 in scale and
    # carry almost nothing a head can learn); mean pooling: the tiny BERT's [CLS] output barely depends on the words.
    return DataArguments(**{"dataset": str(karpathy_dir), "image_encoder": "test_convnext",
                            "pretrained_image_encoder": False, "text_encoder": str(text_dir), "text_pooling": "mean",
                            "image_size": 32, "num_views": 1, "encode_batch_size": 16, **kw})


@pytest.fixture(scope="module")
def prepared(tiny_karpathy_dir, tiny_text_encoder_dir):
    return prepare_features(_data_args(tiny_karpathy_dir, tiny_text_encoder_dir), with_captions=True)


def _config(prepared, num_pairs=12, **kw):
    return RepBlendConfig(**{"image_encoder": "test_convnext", "image_size": 32,
                             "image_dim": prepared.image_encoder.feature_dim,
                             "text_dim": prepared.text_encoder.feature_dim, "embed_dim": 32, "num_pairs": num_pairs,
                             "similarity": "none", "method": "repblend", "lr_img": 0.1, "lr_txt": 0.1, **kw})


def _real_set(prepared, seed=0, **kw):
    train = prepared.features["train"]
    return SyntheticSet.from_real(_config(prepared, **kw), prepared.dataset["train"]["image"], train.caption_features,
                                  train.caption_offsets(), prepared.image_encoder, seed=seed)


def _distill_argv(karpathy_dir, text_dir, out, *extra):
    """examples/distill.py's command line for a tiny run on the test fixtures."""
    return ["--dataset", str(karpathy_dir), "--image_encoder", "test_convnext", "--pretrained_image_encoder", "false",
            "--text_encoder", str(text_dir), "--text_pooling", "mean", "--image_size", "32", "--num_views", "1",
            "--encode_batch_size", "16", "--config", "none", "--num_pairs", "8", "--sim_rank", "2", "--embed_dim", "8",
            "--num_experts", "1", "--expert_train_epochs", "2", "--max_steps", "2", "--save_steps", "2",
            "--eval_strategy", "no", "--mini_batch_size", "4", "--syn_steps", "2", "--max_start_epoch", "1",
            "--eval_seeds", "1", "--baselines", "", "--disable_tqdm", "true", "--report_to", "none",
            "--output_dir", str(out), *extra]


def _tamper_rows(folder, edit):
    """Rewrite a saved set's Parquet rows after ``edit(rows)`` changed them (a damaged or hand-edited artefact)."""
    from datasets import Dataset

    path = str(Path(folder) / "data" / "train-00000-of-00001.parquet")
    table = Dataset.from_parquet(path)
    rows = table.to_dict()
    edit(rows)
    Dataset.from_dict(rows, features=table.features).to_parquet(path)


@pytest.fixture(scope="module")
def experts_dir(prepared, tmp_path_factory):
    """Two experts trained on the cached features (shared: each test that damages them copies them first)."""
    from repblend_hf.trainers import train_experts

    out = tmp_path_factory.mktemp("robustness-experts")
    train_experts(prepared.features["train"], ExpertTrainingArguments(
        output_dir=str(out / "runs"), num_experts=2, num_train_epochs=2, embed_dim=32, disable_tqdm=True,
        logging_steps=1000, report_to="none"), str(out / "experts"))
    return out / "experts"


def _trainer_for(prepared, experts_dir, tmp_path, synthetic, **kw):
    """A DistillationTrainer on the tiny set (real pipeline: experts on cached features, symmetric matching)."""
    from repblend_hf.trainers import DistillationTrainer
    from repblend_hf.trajectories import ExpertTrajectories

    args = DistillationArguments(**{
        "output_dir": str(tmp_path / "run"), "similarity": "none", "distill_loss": "infonce", "mini_batch_size": 6,
        "syn_steps": 2, "max_start_epoch": 1, "lr_img": 0.01, "lr_txt": 0.01, "lr_lr": 1e-4, "lr_init": 0.1,
        "save_strategy": "no", "logging_steps": 1, "disable_tqdm": True, "report_to": "none", **kw})
    return DistillationTrainer(synthetic, args, ExpertTrajectories.load(experts_dir), prepared.image_encoder)


# ----------------------------------------------------------------------------------------------------------------
# 2. An end-to-end test that fails when the pipeline is broken (fixtures whose captions carry the images' colour)
# ----------------------------------------------------------------------------------------------------------------


def test_tiny_text_encoder_separates_captions(tiny_text_encoder_dir):
    encoder = load_text_encoder(str(tiny_text_encoder_dir), pooling="mean")
    captions = ["a red bag", "a blue bag", "a green bag", "the white coat on the left"]
    tokens = encoder.tokenizer(captions[0])["input_ids"]
    assert encoder.tokenizer.unk_token_id not in tokens  # every word is in the vocabulary (it once was all [UNK])
    emb = torch.nn.functional.normalize(encoder.encode_texts(captions), dim=-1)
    cos = emb @ emb.t()
    assert float(cos[~torch.eye(4, dtype=torch.bool)].max()) < 0.999


def test_a_broken_pipeline_scores_below_a_healthy_one(prepared, experts_dir, tmp_path):
    """Real pairs, saved and evaluated by repblend-evaluate, beat the same set with its pairs shuffled or its
    images replaced by noise, and chance; a NaN set is refused. Before issue #12 all of these printed one number."""
    evaluate = _example("evaluate")
    seeds = [0, 1]

    def score(synthetic, name):
        synthetic.save_pretrained(tmp_path / name)
        result, _ = evaluate.evaluate_distilled(str(tmp_path / name), prepared, seeds, {})
        return result.summary()["test"]["r_mean"]["mean"]

    healthy = score(_real_set(prepared), "healthy")
    distilled = _real_set(prepared)
    _trainer_for(prepared, experts_dir, tmp_path, distilled, max_steps=3).train()
    distilled = score(distilled, "distilled")
    shuffled = _real_set(prepared)
    with torch.no_grad():
        shuffled.text_embeddings.copy_(shuffled.text_embeddings.roll(3, 0))  # every image gets another's caption
    noise = _real_set(prepared)
    with torch.no_grad():
        noise.pixel_values.copy_(torch.randn(noise.pixel_values.shape, generator=torch.Generator().manual_seed(0)))
    broken = {"shuffled": score(shuffled, "shuffled"), "noise": score(noise, "noise")}

    test = prepared.features["test"]
    rng = np.random.default_rng(0)
    from repblend_hf.evaluation import retrieval_metrics

    chance = np.mean([retrieval_metrics(rng.random((test.num_images, test.num_captions)),
                                        test.caption_to_image)["r_mean"] for _ in range(50)])
    assert healthy > chance + 10, (healthy, chance)
    for name, value in broken.items():
        assert min(healthy, distilled) > value + 8, (name, healthy, distilled, value)

    _real_set(prepared).save_pretrained(tmp_path / "nan")  # then a NaN written into its rows, as a damaged file
    _tamper_rows(tmp_path / "nan", lambda rows: rows["text_embedding"][0].__setitem__(0, float("nan")))
    with pytest.raises(ValueError, match=r"NaN/inf in text_embeddings \(1 values\)"):
        evaluate.evaluate_distilled(str(tmp_path / "nan"), prepared, seeds, {})


# ----------------------------------------------------------------------------------------------------------------
# 1. Finiteness: rejected at parse time, checked after every step, never saved, loaded, evaluated or pushed
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lr_img", "lr_txt", "lr_sim", "lr_lr", "lr_init", "syn_momentum", "weight_decay"])
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_hyperparameters_are_rejected_at_parse_time(name, value, tmp_path):
    from transformers import HfArgumentParser

    parser = HfArgumentParser(DistillationArguments)
    with pytest.raises(ValueError, match=rf"^{name} must be a finite number, got -?(inf|nan); set --{name}"):
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), f"--{name}={value}"])
    with pytest.raises(ValueError, match="temperature must be a finite number"):
        ExpertTrainingArguments(output_dir=str(tmp_path), temperature=float(value))
    with pytest.raises(ValueError, match="lr_img must be finite"):
        RepBlendConfig(lr_img=float("inf"))


def test_a_step_that_makes_the_set_non_finite_is_rolled_back(prepared, experts_dir, tmp_path):
    """An inf lr set after parsing (what ``--lr_txt inf`` did before the parse-time check): the loss and gradients
    are finite, the update is not. The parameter check after the step sees it; the step is undone (momentum too)
    and counted as skipped, the lr lowered, and the run stops with NonFiniteError when that does not help."""
    from repblend_hf.trainers import NonFiniteError

    before = {k: v.clone() for k, v in _real_set(prepared).state_dict().items()}
    synthetic = _real_set(prepared)
    trainer = _trainer_for(prepared, experts_dir, tmp_path, synthetic, max_steps=2, nonfinite_patience=10)
    trainer.args.lr_txt = float("inf")
    trainer.train()
    after = synthetic.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every step rolled back: the set is the initial one
    assert all("momentum_buffer" not in trainer.optimizer.state.get(p, {}) for p in synthetic.parameters())
    logged = [h for h in trainer.state.log_history if "nonfinite_skipped" in h]
    assert [h["nonfinite_skipped"] for h in logged] == [1.0, 1.0]

    trainer = _trainer_for(prepared, experts_dir, tmp_path, _real_set(prepared), max_steps=6, nonfinite_patience=2,
                           nonfinite_max_lowerings=1)
    trainer.args.lr_txt = float("inf")
    with pytest.raises(NonFiniteError, match=r"non-finite matching loss, gradient or update in \['texts'\]"):
        trainer.train()


def _nan_set(prepared):
    synthetic = _real_set(prepared)
    with torch.no_grad():
        synthetic.pixel_values[0, 0, 0, 0] = float("nan")
    return synthetic


def test_a_non_finite_set_is_never_saved_pushed_or_evaluated(prepared, tmp_path):
    synthetic = _nan_set(prepared)
    with pytest.raises(ValueError, match=r"cannot export this SyntheticSet: NaN/inf in pixel_values \(1 values\)"):
        synthetic.save_pretrained(tmp_path / "set")
    assert not (tmp_path / "set" / "data" / "train-00000-of-00001.parquet").exists()
    with pytest.raises(ValueError, match="cannot export this SyntheticSet"):  # before any network call
        synthetic.push_to_hub("someone/never-pushed", token="hf_unused")
    features = torch.zeros(3, 4)
    features[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"PairSet.image_features holds 1 NaN/inf value"):
        PairSet(features, torch.zeros(3, 2))
    with pytest.raises(ValueError, match="lr_img must be finite"):
        PairSet(torch.zeros(3, 4), torch.zeros(3, 2), lr_img=float("inf"))


def test_evaluate_script_refuses_a_non_finite_set_before_encoding(prepared, tmp_path, monkeypatch):
    """repblend-evaluate loads the set before the dataset is encoded: a NaN set stops there, no result."""
    evaluate = _example("evaluate")
    folder = tmp_path / "set"
    _real_set(prepared).save_pretrained(folder)
    _tamper_rows(folder, lambda rows: rows["pixel_values"][2][0][0].__setitem__(0, float("inf")))
    monkeypatch.setattr(evaluate, "prepare_features", lambda *a, **k: pytest.fail("encoded before checking the set"))
    with pytest.raises(ValueError, match=r"--distilled_set .*NaN/inf in pixel_values \(1 values\)"):
        evaluate.main(["--method", "distilled", "--distilled_set", str(folder), "--output_dir", str(tmp_path / "ev")])
    assert not (tmp_path / "ev" / "results.json").exists()


# ----------------------------------------------------------------------------------------------------------------
# 3. Caches know what made them: every image file, the transforms and the tokenizer key the features
# ----------------------------------------------------------------------------------------------------------------


def test_replacing_the_images_recomputes_the_features(tiny_karpathy_dir, tiny_text_encoder_dir, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(tiny_karpathy_dir, folder)
    args = _data_args(folder, tiny_text_encoder_dir)
    first = prepare_features(args).features["train"].image_features
    for path in (folder / "images").glob("*.png"):  # every image black, same file names
        PILImage.new("RGB", (32, 32)).save(path)
        os.utime(path, ns=(1, 1))  # even with an old mtime: the size changed
    again = prepare_features(args).features["train"].image_features
    assert not torch.allclose(first, again)
    assert torch.allclose(again, again[:1].expand_as(again))  # all black: one feature for every image


def test_transform_and_tokenizer_changes_change_the_fingerprints(tiny_text_encoder_dir, tmp_path):
    from repblend_hf.encoders import FrozenImageEncoder

    image = load_image_encoder("test_convnext", pretrained=False, image_size=32)
    other_crop = FrozenImageEncoder(image.model, image.name, image.image_size, augment_scale=(0.3, 1.0))
    assert other_crop.fingerprint != image.fingerprint  # the augmented views' crop scale
    text = load_text_encoder(str(tiny_text_encoder_dir), pooling="mean")
    folder = tmp_path / "other-tokenizer"
    shutil.copytree(tiny_text_encoder_dir, folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["red"], vocab["blue"] = vocab["blue"], vocab["red"]  # same weights, another tokenizer
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    swapped = load_text_encoder(str(folder), pooling="mean")
    swapped.name = text.name  # the same name too: only the tokenizer differs
    assert swapped.fingerprint != text.fingerprint


# ----------------------------------------------------------------------------------------------------------------
# 4. No lost work: checkpoints need a decision; lrs changed at resume win (what NonFiniteError advises)
# ----------------------------------------------------------------------------------------------------------------


def test_checkpoints_in_the_output_dir_need_resume_or_overwrite(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "keep.txt").write_text("finished work")
    with pytest.raises(ValueError, match=r"already holds checkpoints of an earlier run \(checkpoint-4\).*"
                                         r"--resume_from_checkpoint latest.*--overwrite_output_dir true"):
        check_output_dir(tmp_path)
    assert (tmp_path / "checkpoint-4" / "keep.txt").exists()
    check_output_dir(tmp_path, resume_from_checkpoint="latest")  # continuing is fine
    check_output_dir(tmp_path, overwrite_output_dir=True)
    assert not (tmp_path / "checkpoint-4").exists()


def test_distill_script_stops_before_any_work_when_checkpoints_exist(tiny_karpathy_dir, tiny_text_encoder_dir,
                                                                     tmp_path, monkeypatch):
    distill = _example("distill")
    (tmp_path / "out" / "checkpoint-2").mkdir(parents=True)
    monkeypatch.setattr(distill, "prepare_features", lambda *a, **k: pytest.fail("encoded before the check"))
    with pytest.raises(ValueError, match="--resume_from_checkpoint latest to continue that run"):
        distill.main(_distill_argv(tiny_karpathy_dir, tiny_text_encoder_dir, tmp_path / "out"))


def test_lrs_lowered_on_the_command_line_win_on_resume(prepared, experts_dir, tmp_path):
    """Do what the NonFiniteError says: lower the lr and resume from the latest checkpoint. The run must then
    use the new lr (it used to restore the checkpoint's and fail again); an lr left unchanged keeps the
    checkpoint's, automatic lowerings included."""
    from repblend_hf.trainers import NonFiniteError


    def run(resume=None, lr_img=1.0):
        synthetic = _real_set(prepared)
        trainer = _trainer_for(prepared, experts_dir, tmp_path, synthetic, max_steps=10, save_strategy="steps",
                               save_steps=2, nonfinite_patience=2, nonfinite_max_lowerings=1, lr_img=lr_img,
                               lr_txt=1.0)
        real_sample = trainer.trajectories.sample_segment

        def diverging(*a, **k):  # from step 3 on, a non-finite target whenever the image lr is above 0.3
            segment = real_sample(*a, **k)
            if trainer.state.global_step >= 2 and trainer.optimizer.param_groups[0]["lr"] > 0.3:
                segment.target_params["image"][0] = float("inf")
            return segment

        trainer.trajectories.sample_segment = diverging
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    with pytest.raises(NonFiniteError, match=r"lower the learning rates .*--lr_img.* --resume_from_checkpoint latest"):
        run()
    latest = last_complete_checkpoint(tmp_path / "run")
    assert latest is not None
    trainer = run(resume=check_resume(tmp_path / "run", "latest"), lr_img=0.2)
    assert trainer.state.global_step == 10
    resumed = [h["nonfinite_skipped"] for h in trainer.state.log_history if "nonfinite_skipped" in h and h["step"] > 4]
    assert resumed == [0.0] * 6  # the new lr held from the first resumed iteration
    lrs = {g["name"]: g["lr"] for g in trainer.optimizer.param_groups}
    assert lrs["images"] == 0.2  # from the command line
    assert lrs["texts"] == 0.5  # unchanged on the command line: the checkpoint's lowered value


# ----------------------------------------------------------------------------------------------------------------
# 5. Everything that can be judged before the long work is judged there
# ----------------------------------------------------------------------------------------------------------------

BEFORE_ANY_WORK = [
    (["--num_pairs", "0"], r"num_pairs must be >= 1, got 0"),
    (["--num_pairs=-4"], r"num_pairs must be >= 1, got -4"),
    (["--sim_rank", "9"], r"sim_rank \(9\) must be in 1\.\.num_pairs \(8\).*--similarity full"),
    (["--max_start_epoch", "3"], r"max_start_epoch - 1 \+ expert_epochs = 2 \+ 1 = 3, beyond the 2 epochs.*"
                                 r"--expert_train_epochs"),
    (["--eval_seeds", "0"], r"eval_seeds must be >= 1, got 0"),
    (["--baselines", "full", "--full_data_seeds", "0"], r"full_data_seeds must be >= 1, got 0; or leave 'full' out"),
    (["--baselines", "random,kcentre"], r"unknown baseline 'kcentre' in --baselines \(did you mean 'kcenter'\?\)"),
    (["--lr_img", "inf"], r"lr_img must be a finite number, got inf"),
    (["--fp16", "true"], r"fp16 needs a GPU, but this run is on the CPU"),
    (["--eval_seeds", "0", "--num_pairs", "0"], r"2 problems with the arguments:\n  - num_pairs.*\n  - eval_seeds"),
    (["--dataset_kwargs", "{not json"], r"--dataset_kwargs is not valid JSON"),
    (["--stage_pairs", "4", "5"], r"stage_pairs \[4, 5\] must be positive and add up to num_pairs=8"),
    (["--stage_pairs", "4", "4", "--stage_max_start_epoch", "1", "3"],
     r"stage 2 needs experts of 3 epochs .* beyond the 2 epochs the experts are trained for"),
    (["--stage_pairs", "4", "4", "--resume_from_checkpoint", "somewhere/checkpoint-2"],
     r"a run in stages resumes each stage from its own folder: pass --resume_from_checkpoint latest"),
]


@pytest.mark.parametrize(("extra", "message"), BEFORE_ANY_WORK, ids=[" ".join(e) for e, _ in BEFORE_ANY_WORK])
def test_distill_script_fails_before_any_work(extra, message, tiny_karpathy_dir, tiny_text_encoder_dir, tmp_path,
                                              monkeypatch):
    if "--fp16" in extra and torch.cuda.is_available():
        pytest.skip("fp16 is accepted on a GPU")
    distill = _example("distill")
    monkeypatch.setattr(distill, "prepare_features", lambda *a, **k: pytest.fail("encoded before the check"))
    with pytest.raises(ValueError, match=message):
        distill.main(_distill_argv(tiny_karpathy_dir, tiny_text_encoder_dir, tmp_path / "out", *extra))


def test_output_dir_that_is_a_file_or_unwritable_fails_first(tiny_karpathy_dir, tiny_text_encoder_dir, tmp_path,
                                                             monkeypatch):
    distill = _example("distill")
    monkeypatch.setattr(distill, "prepare_features", lambda *a, **k: pytest.fail("encoded before the check"))
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="is a file, not a directory"):
        distill.main(_distill_argv(tiny_karpathy_dir, tiny_text_encoder_dir, tmp_path / "a_file"))
    with pytest.raises(ValueError, match="is not a writable directory"):  # (chmod does not stop root: a file's child)
        distill.main(_distill_argv(tiny_karpathy_dir, tiny_text_encoder_dir, tmp_path / "a_file" / "out"))


def test_more_pairs_than_images_fails_after_loading_before_encoding(tiny_karpathy_dir, tiny_text_encoder_dir,
                                                                    tmp_path, monkeypatch):
    import repblend_hf.pipeline as pipeline

    distill = _example("distill")
    monkeypatch.setattr(pipeline, "encode_dataset", lambda *a, **k: pytest.fail("encoded before the data check"))
    with pytest.raises(ValueError, match=r"num_pairs=41 exceeds the 40 training images.*at most 40"):
        distill.main(_distill_argv(tiny_karpathy_dir, tiny_text_encoder_dir, tmp_path / "out", "--num_pairs", "41"))
    evaluate = _example("evaluate")
    with pytest.raises(ValueError, match=r"--pairs 41 exceeds the 40 training images"):
        evaluate.main(["--dataset", str(tiny_karpathy_dir), "--text_encoder", str(tiny_text_encoder_dir),
                       "--image_encoder", "test_convnext", "--pretrained_image_encoder", "false", "--pairs", "41",
                       "--output_dir", str(tmp_path / "ev")])


@pytest.mark.slow
def test_bf16_on_the_cpu_runs_the_whole_script(tiny_karpathy_dir, tiny_text_encoder_dir, tmp_path):
    """``--bf16 true --use_cpu true`` used to die after the experts ("AcceleratorState has already been
    initialized"): the expert stage now runs in the same mixed precision as the distillation."""
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "ACCELERATE_USE_CPU": "true"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ROOT / "examples" / "distill.py"),
           *_distill_argv(tiny_karpathy_dir, tiny_text_encoder_dir, tmp_path / "out", "--bf16", "true", "--use_cpu",
                          "true")]
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "out" / "synthetic_set" / "config.json").exists()


# ----------------------------------------------------------------------------------------------------------------
# 6. Loading: high bit depths and palettes converted right, damaged files named at load time
# ----------------------------------------------------------------------------------------------------------------


def _write_karpathy(folder, captions=("a red bag", "a blue shoe")):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(2):
        PILImage.fromarray(np.full((8, 8, 3), 60 * (i + 1), np.uint8)).save(folder / "images" / f"{i}.png")
    for name in ("train.json", "val.json", "test.json"):
        rows = [{"image": f"images/{i}.png", "caption": [captions[i]]} for i in range(2)]
        (folder / name).write_text(json.dumps(rows))


def test_16_bit_and_palette_images_are_converted_not_whitened(tmp_path):
    from repblend_hf.data import load_image_text_dataset
    from repblend_hf.data.images import to_rgb

    _write_karpathy(tmp_path)
    gray16 = np.full((8, 8), 32896, np.uint16)  # 128 * 257: mid grey in 16 bit
    gray16[0, 0] = 65535
    PILImage.fromarray(gray16).save(tmp_path / "images" / "0.png")  # a 16-bit grayscale PNG
    palette = PILImage.new("P", (8, 8))
    palette.putpalette([0, 0, 0, 200, 40, 40] + [0] * 762)
    palette.paste(1, (0, 0, 8, 8))
    palette.save(tmp_path / "images" / "1.png", transparency=0)  # a palette PNG with a transparent entry
    loaded = load_image_text_dataset(str(tmp_path), cache_dir=str(tmp_path / "cache"))
    first, second = loaded["train"][0]["image"], loaded["train"][1]["image"]
    assert first.mode.startswith("I")  # what PIL decodes; convert("RGB") made 99 % of it white (255)
    rgb = np.asarray(to_rgb(first))
    assert rgb.shape == (8, 8, 3) and rgb[1, 1].tolist() == [128, 128, 128] and rgb[0, 0].tolist() == [255] * 3
    assert np.asarray(to_rgb(second))[3, 3].tolist() == [200, 40, 40]
    encoder = load_image_encoder("test_convnext", pretrained=False, image_size=32)
    expected = encoder.encode_images([PILImage.fromarray(rgb)])
    assert torch.allclose(encoder.encode_images([first]), expected)  # the encoders see the converted image


@pytest.mark.parametrize("kind", ["png", "jpeg"])
def test_a_truncated_image_is_named_at_load_time(kind, tmp_path):
    from repblend_hf.data import load_image_text_dataset

    _write_karpathy(tmp_path)
    path = tmp_path / "images" / "1.png"
    rng = np.random.default_rng(0)
    PILImage.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8)).save(path, format=kind.upper())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])  # the header is intact, the pixels are not
    with pytest.raises(ValueError, match=r"Image file .*images/1\.png is not a readable image .*truncated"):
        load_image_text_dataset(str(tmp_path), cache_dir=str(tmp_path / "cache"))


def test_bad_json_non_utf8_and_empty_captions_are_named(tmp_path):
    from repblend_hf.data import load_image_text_dataset

    _write_karpathy(tmp_path)
    (tmp_path / "val.json").write_text('[{"image": "images/0.png", "caption": ["a"]}')  # missing bracket
    with pytest.raises(ValueError, match=r"val\.json is not valid JSON: .* at line 1, column \d+"):
        load_image_text_dataset(str(tmp_path), cache_dir=str(tmp_path / "cache"))
    _write_karpathy(tmp_path)
    (tmp_path / "test.json").write_bytes('[{"image": "images/0.png", "caption": ["caf\u00e9"]}]'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"test\.json is not UTF-8 text \(byte \d+"):
        load_image_text_dataset(str(tmp_path), cache_dir=str(tmp_path / "cache"))
    _write_karpathy(tmp_path, captions=("a red bag", "  "))
    with pytest.raises(ValueError, match=r"train\.json: row 1 of caption column 'caption' has an empty caption"):
        load_image_text_dataset(str(tmp_path), cache_dir=str(tmp_path / "cache"))


# ----------------------------------------------------------------------------------------------------------------
# 7. Artefacts: configs that disagree with the data, damaged files, tokens, skipped iterations
# ----------------------------------------------------------------------------------------------------------------


def test_a_config_that_disagrees_with_the_rows_is_refused(prepared, tmp_path):
    folder = tmp_path / "set"
    _real_set(prepared, similarity="lowrank", sim_rank=2).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "similarity": "none"}))
    with pytest.raises(ValueError, match=r"config.json says similarity='none'.*the rows have \['similarity_diag'"):
        SyntheticSet.from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config))
    SyntheticSet.from_pretrained(folder)  # intact again

    def drop_similarity(rows):
        for key in [k for k in rows if k.startswith("similarity_")]:
            del rows[key]

    from datasets import Dataset

    path = str(folder / "data" / "train-00000-of-00001.parquet")
    table = Dataset.from_parquet(path)
    table.remove_columns([c for c in table.column_names if c.startswith("similarity_")]).to_parquet(path)
    with pytest.raises(ValueError, match=r"similarity='lowrank'.*but the rows have no similarity columns"):
        SyntheticSet.from_pretrained(folder)


def test_damaged_checkpoints_are_named_and_the_previous_one_is_used(prepared, experts_dir, tmp_path, caplog):
    trainer = _trainer_for(prepared, experts_dir, tmp_path, _real_set(prepared), max_steps=4, save_strategy="steps",
                           save_steps=2, save_total_limit=None)
    trainer.train()
    newest = tmp_path / "run" / "checkpoint-4"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # truncated (a full disk, a copy cut short)
    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoint-4: .*model\.safetensors is truncated or "
                                         r"damaged.*newest intact checkpoint is .*checkpoint-2.*latest"):
        check_resume(tmp_path / "run", str(newest))
    assert check_resume(tmp_path / "run", "latest") == str(tmp_path / "run" / "checkpoint-2")
    assert "skipping checkpoint" in caplog.text and "model.safetensors is truncated" in caplog.text
    # The trainer itself names it too (a library user resuming by path), instead of a bare SafetensorError.
    again = _trainer_for(prepared, experts_dir, tmp_path, _real_set(prepared), max_steps=6)
    with pytest.raises(ValueError, match=r"cannot resume from .*checkpoint-4.*checkpoint-2"):
        again.train(resume_from_checkpoint=str(newest))
    # A checkpoint of another similarity kind: the difference is named (it was an unrelated AttributeError).
    other = _trainer_for(prepared, experts_dir, tmp_path, _real_set(prepared, similarity="full"), max_steps=6,
                         similarity="full", distill_loss="wbce")
    with pytest.raises(ValueError, match=r"checkpoint-2 holds a set made with other settings \(this run needs "
                                         r"\['similarity.matrix'\]"):
        other.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))


def test_a_damaged_expert_file_is_named(prepared, experts_dir, tmp_path):
    from repblend_hf.checks import check_expert_files
    from repblend_hf.trajectories import ExpertTrajectories

    shutil.copytree(experts_dir, tmp_path / "experts")
    path = tmp_path / "experts" / "expert_001.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"expert file .*expert_001\.safetensors is unreadable.*Delete it"):
        ExpertTrajectories.load(tmp_path / "experts")
    with pytest.raises(ValueError, match=r"expert file .*expert_001\.safetensors is unreadable"):
        check_expert_files(tmp_path / "experts")


def test_the_hub_token_is_never_written_into_a_checkpoint(prepared, experts_dir, tmp_path):
    secret = "hf_do_not_write_me_1234567890"
    trainer = _trainer_for(prepared, experts_dir, tmp_path, _real_set(prepared), max_steps=2, save_strategy="steps",
                           save_steps=2, hub_token=secret)
    trainer.train()
    saved = tmp_path / "run" / "checkpoint-2" / "training_args.bin"
    raw = saved.read_bytes()
    import zipfile

    with zipfile.ZipFile(io.BytesIO(raw)) as archive:  # torch.save writes a zip; look inside every member
        assert not any(secret.encode() in archive.read(name) for name in archive.namelist())
    assert torch.load(saved, weights_only=False).hub_token is None
    assert trainer.args.hub_token == secret  # the live arguments keep it for the pushes that need it


def test_skipped_iterations_are_logged_as_skipped_not_as_loss_0(prepared, experts_dir, tmp_path):
    trainer = _trainer_for(prepared, experts_dir, tmp_path, _real_set(prepared), max_steps=4, logging_steps=2)
    real_sample = trainer.trajectories.sample_segment

    def poisoned(*a, **k):  # iterations 2, 3 and 4 get a NaN target; 1 is healthy
        segment = real_sample(*a, **k)
        if trainer.state.global_step >= 1:
            segment.target_params["text"][0] = float("nan")
        return segment

    trainer.trajectories.sample_segment = poisoned
    losses = []
    trainer.add_callback(type("Spy", (__import__("transformers").TrainerCallback,), {
        "on_step_end": lambda self, args, state, control, **kw: losses.append(
            trainer._metrics["matching_loss"][-1] if trainer._metrics.get("matching_loss") else None)})())
    trainer.train()
    first, second = [h for h in trainer.state.log_history if "nonfinite_skipped" in h]
    assert first["nonfinite_skipped"] == 0.5 and second["nonfinite_skipped"] == 1.0
    assert first["loss"] == pytest.approx(losses[0], rel=1e-4)  # the healthy iteration's loss, not its mean with 0
    assert first["matching_loss"] == pytest.approx(losses[0], rel=1e-4)
    assert "loss" not in second and "matching_loss" not in second  # every iteration skipped: no loss at all


def test_the_guard_copies_the_set_only_when_an_sgd_step_could_overflow():
    # The guard's rollback copies cost ~0.15 s an iteration at 999 images; it skips them when a bound proves the
    # SGD-with-momentum step finite, and keeps them for anything it cannot bound.
    from repblend_hf.trainers.callbacks import _sgd_step_stays_finite

    p = torch.nn.Parameter(torch.full((3, 4), 2.0))
    p.grad = torch.full((3, 4), 10.0)
    sgd = {"lr": 100.0, "momentum": 0.5}
    assert _sgd_step_stays_finite(p, sgd, {"momentum_buffer": torch.ones(3, 4)})
    assert not _sgd_step_stays_finite(p, {**sgd, "lr": 1e38}, {})  # 2 + 1e38 * 10 overflows float32
    assert not _sgd_step_stays_finite(p, {**sgd, "lr": float("inf")}, {})
    assert not _sgd_step_stays_finite(p, sgd, {"momentum_buffer": torch.full((3, 4), float("nan"))})
    assert not _sgd_step_stays_finite(p, {**sgd, "adam": True}, {})  # Adam: not bounded here, copies kept
    assert not _sgd_step_stays_finite(p, {**sgd, "weight_decay": 5e-4}, {})


def test_a_step_proven_finite_ends_the_streak_of_skipped_iterations():
    # Only consecutive skipped iterations lower the lrs: a good step in between, copied or proven finite, resets.
    from types import SimpleNamespace

    from repblend_hf.trainers.callbacks import NonFiniteGuard

    p = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([{"params": [p], "name": "images"}], lr=0.1, momentum=0.5)
    args = SimpleNamespace(nonfinite_patience=3, nonfinite_max_lowerings=1, nonfinite_lr_factor=0.1)
    guard = NonFiniteGuard(SimpleNamespace(optimizer=optimizer, args=args, state=None, lr_scheduler=None))
    guard.skipped({"images"})
    guard.skipped({"images"})
    p.grad = torch.ones(3)
    guard.on_pre_optimizer_step(None, None, None)
    assert guard._saved == {}  # proven finite: nothing copied
    optimizer.step()
    guard.on_optimizer_step(None, None, None)
    assert guard.streak == 0
