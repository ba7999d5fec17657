"""The Hub artefact (DESIGN.md): push, ``load_dataset``, ``from_hub``, failed pushes, cards, templates in the wheel.

Pushes and downloads run the real ``huggingface_hub`` / ``datasets`` / ``transformers`` clients against
the loopback Hub stand-in of ``tests/hub_server.py`` (not the Hub). They run in subprocesses:
those libraries read ``HF_ENDPOINT`` and the offline switches when imported, and ``conftest.py`` has
already made this process offline.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path

import pytest
from hub_server import TEST_TOKEN, HubStandIn, client_env, hub_fixture  # noqa: F401 - registers the "hub" fixture

REPO_ROOT = Path(__file__).resolve().parents[1]
PARQUET = "data/train-00000-of-00001.parquet"
METRICS = ("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10", "r_mean")

# Helpers every client script starts with: a small distilled set with perturbed parameters and
# non-default learned lrs, results records, and a way to arm a fault on the stand-in.
PRELUDE = r'''
import hashlib, json, logging, os, sys, tempfile, urllib.request
from pathlib import Path
import torch
from repblend_hf import ExpertTrajectories, RepBlendConfig, SyntheticSet

logging.basicConfig(level=logging.DEBUG)  # as loud as it gets: the token must still not show
METRICS = ("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10", "r_mean")


def make_set(seed=0):
    torch.manual_seed(seed)
    config = RepBlendConfig(num_pairs=6, image_size=8, text_dim=16, embed_dim=8, sim_rank=2, sim_alpha=2.0,
                            lr_img=0.05, lr_txt=0.2, source_dataset="fashion-scenes")
    synthetic = SyntheticSet(config, torch.randn(6, 3, 8, 8), torch.randn(6, 16))
    with torch.no_grad():
        for p in synthetic.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return synthetic


def state(synthetic):
    return {k: v.detach().clone() for k, v in synthetic.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def record(method, pairs, value, diagnostics=True):
    out = {"dataset": "fashion-scenes", "method": method, "pairs": pairs,
           "test": {m: {"mean": value + i, "std": 0.5} for i, m in enumerate(METRICS)}}
    if diagnostics:
        out["diagnostics"] = {"sim_image": {"mean": 0.25, "std": 0.01}, "sim_text": {"mean": 0.5, "std": 0.02},
                              "gap": {"mean": 0.75, "std": 0.03}}
    return out


def arm(**fault):
    request = urllib.request.Request(os.environ["HF_ENDPOINT"] + "/_standin/faults", method="POST",
                                     data=json.dumps(fault).encode())
    urllib.request.urlopen(request).read()


def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


out = {}
'''

SESSION = PRELUDE + r'''
from datasets import load_dataset
from PIL import Image

token = os.environ.pop("HF_TOKEN")  # passed explicitly from here on
work = Path(tempfile.mkdtemp())
synthetic = make_set()
original = state(synthetic)
grid = work / "grid.png"
Image.new("RGB", (24, 16), (200, 30, 90)).save(grid)
results = [record("repblend", 6, 10.0), record("random", 6, 2.0, diagnostics=False)]
commit = synthetic.push_to_hub("repblend-tester/tiny-set", token=token, results=results, grid_image=grid,
                               nearest_captions=[f"a red bag number {i}" for i in range(6)],
                               card_data={"license": "mit", "tags": ["fashion"]})
out["commit_oid"], out["commit_url"], out["grid_sha256"] = commit.oid, str(commit), sha256(grid)

rows = load_dataset("repblend-tester/tiny-set", split="train", token=token)
out["columns"], out["num_rows"] = rows.column_names, rows.num_rows
out["first_caption"] = rows[0]["nearest_caption"]
out["image_size"] = list(rows[0]["image"].size)

loaded = SyntheticSet.from_hub("repblend-tester/tiny-set", token=token)
out["from_hub_exact"] = same(original, state(loaded))
out["from_hub_lrs"] = [loaded.config.lr_img, loaded.config.lr_txt]
pinned = SyntheticSet.from_hub("repblend-tester/tiny-set", revision=commit.oid, token=token)
out["from_hub_revision_exact"] = same(original, state(pinned))

config = RepBlendConfig.from_hub("repblend-tester/tiny-set", token=token)
out["config"] = {"model_type": config.model_type, "lr_img": config.lr_img, "lr_txt": config.lr_txt,
                 "num_pairs": config.num_pairs}
out["synced_lrs"] = [synthetic.config.inner_lr_img, synthetic.config.inner_lr_txt]
# from_pretrained on the dataset repo of the push: no model repo of that id, so it looks in the dataset repo.
for repo_type in (None, "dataset"):
    pretrained = RepBlendConfig.from_pretrained("repblend-tester/tiny-set", token=token, repo_type=repo_type)
    out[f"from_pretrained_{repo_type}"] = {k: v for k, v in pretrained.to_dict().items() if k != "_name_or_path"}
out["from_hub_config"] = {k: v for k, v in config.to_dict().items() if k != "_name_or_path"}
try:
    RepBlendConfig.from_pretrained("repblend-tester/tiny-set", token=token, repo_type="model")
    out["from_pretrained_model"] = "no error"
except OSError as err:
    out["from_pretrained_model"] = type(err).__name__
try:
    RepBlendConfig.from_pretrained("repblend-tester/no-such-set", token=token)
    out["from_pretrained_missing"] = "no error"
except OSError as err:
    out["from_pretrained_missing"] = str(err)

# The other routes, through the real client: whoami, paths-info, commit history, refs, ranged reads.
from huggingface_hub import HfApi, HfFileSystem

api = HfApi(token=token)
out["whoami"] = api.whoami()["name"]
out["paths_info"] = sorted(f"{type(x).__name__}:{x.path}" for x in api.get_paths_info(
    "repblend-tester/tiny-set", ["config.json", "data", "missing.txt"], repo_type="dataset"))
out["commits"] = [c.commit_id for c in api.list_repo_commits("repblend-tester/tiny-set", repo_type="dataset")]
out["branches"] = [[b.name, b.target_commit] for b in api.list_repo_refs("repblend-tester/tiny-set",
                                                                         repo_type="dataset").branches]
with HfFileSystem(token=token).open("datasets/repblend-tester/tiny-set/config.json", "rb") as f:
    f.seek(4)
    out["ranged_read"] = f.read(12).decode()

# Expert trajectories: one expert held as a file (lazy), one in memory.
meta = {"branch_sizes": {"image": 5, "text": 3}, "num_epochs": 2, "image_encoder": "test_efficientnet",
        "dataset": "fashion-scenes", "num_experts": 2}
experts = ExpertTrajectories(meta)
experts.add_expert({"image": torch.randn(3, 5), "text": torch.randn(3, 3)})
experts = ExpertTrajectories.load(experts.save(work / "experts"))
experts.add_expert({"image": torch.randn(3, 5), "text": torch.randn(3, 3)})
traj_commit = experts.push_to_hub("repblend-tester/tiny-experts", token=token)
back = ExpertTrajectories.from_hub("repblend-tester/tiny-experts", token=token)
out["trajectories_indices"] = back.expert_indices
out["trajectories_metadata_equal"] = back.metadata == experts.metadata
out["trajectories_exact"] = all(
    all(torch.equal(back.expert_snapshots(i)[b], experts.expert_snapshots(i)[b]) for b in experts.branches)
    for i in experts.expert_indices)
out["trajectories_oid"] = traj_commit.oid

# A repo that is not a distilled set (the trajectories repo has no config.json).
for name, load in (("from_hub", SyntheticSet.from_hub), ("config_from_hub", RepBlendConfig.from_hub)):
    try:
        load("repblend-tester/tiny-experts", token=token)
        out[f"not_a_set_{name}"] = "no error"
    except ValueError as err:
        out[f"not_a_set_{name}"] = str(err)
print("RESULT " + json.dumps(out))
'''

FAILED_PUSH = PRELUDE + r'''
work = Path(tempfile.mkdtemp())
synthetic = make_set()
v1_state = state(synthetic)
out["v1"] = synthetic.push_to_hub("repblend-tester/flaky").oid

with torch.no_grad():
    synthetic.pixel_values.add_(1.0)  # a new version of the set
v2_state = state(synthetic)
saved = synthetic.save_pretrained(work / "synthetic_set")
saved_hashes = {p.name: sha256(p) for p in saved.rglob("*") if p.is_file()}

errors = []
arm(route="lfs-upload", status=403, message="Request has expired")  # fails after preupload, before the commit
arm(route="commit", status=500)  # fails once the parquet is uploaded: the commit request itself
for _ in range(2):
    try:
        synthetic.push_to_hub("repblend-tester/flaky")
        errors.append("no error")
    except RuntimeError as err:
        errors.append(str(err))
out["errors"] = errors
out["local_intact"] = same(v2_state, state(synthetic))
out["output_dir_intact"] = saved_hashes == {p.name: sha256(p) for p in saved.rglob("*") if p.is_file()}
out["output_dir_loads"] = same(v2_state, state(SyntheticSet.from_pretrained(saved)))
out["served_is_v1"] = same(v1_state, state(SyntheticSet.from_hub("repblend-tester/flaky")))
out["retry"] = synthetic.push_to_hub("repblend-tester/flaky").oid  # the advice: just retry
out["served_after_retry_is_v2"] = same(v2_state, state(SyntheticSet.from_hub("repblend-tester/flaky")))
print("RESULT " + json.dumps(out))
'''


def _result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, f"client failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, proc.stdout[-3000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    """One client session against a fresh stand-in: push, load_dataset, from_hub, trajectories, errors."""
    with HubStandIn(tmp_path_factory.mktemp("hub-standin")) as server:
        env = {**client_env(server.endpoint, server.token, tmp_path_factory.mktemp("client-cache")), "HF_DEBUG": "1"}
        proc = subprocess.run([sys.executable, "-c", SESSION], env=env, capture_output=True, text=True, timeout=300)
        yield _result(proc), server, proc


# ----- the distilled set on the (stand-in) Hub ----------------------------------------------------------------------


@pytest.mark.hub
def test_pushed_set_reads_back_with_load_dataset_and_from_hub(session):
    out, server, _ = session
    assert out["columns"] == ["image", "pixel_values", "text_embedding", "similarity_diag", "similarity_left",
                              "similarity_right", "nearest_caption"]
    assert out["num_rows"] == 6 and out["first_caption"] == "a red bag number 0" and out["image_size"] == [8, 8]
    assert out["from_hub_exact"] and out["from_hub_revision_exact"]
    assert out["config"]["model_type"] == "repblend" and out["config"]["num_pairs"] == 6
    # The learned lrs (perturbed away from 0.05 / 0.2) travel in config.json.
    assert [out["config"]["lr_img"], out["config"]["lr_txt"]] == out["synced_lrs"] == out["from_hub_lrs"]
    assert out["synced_lrs"] != [0.05, 0.2]


@pytest.mark.hub
def test_config_from_pretrained_finds_the_dataset_repo_of_a_push(session):
    out, _, _ = session
    assert out["from_pretrained_None"] == out["from_pretrained_dataset"] == out["from_hub_config"]
    assert out["from_pretrained_None"]["num_pairs"] == 6
    assert [out["from_pretrained_None"][k] for k in ("inner_lr_img", "inner_lr_txt")] == out["synced_lrs"]
    assert out["from_pretrained_model"].endswith("Error")  # repo_type="model" never looks in the dataset repo
    assert out["from_pretrained_missing"].startswith(
        "repblend-tester/no-such-set is not a local folder, and neither a model repo nor a dataset repo of that id "
        "holds a config.json")


@pytest.mark.hub
def test_push_is_one_commit_with_rows_config_card_and_grid(session):
    out, server, _ = session
    history = server.history("repblend-tester/tiny-set")
    assert len(history) == 2 and history[0] == out["commit_oid"]  # the repo's first commit, then ours
    assert out["commit_url"].endswith(f"/datasets/repblend-tester/tiny-set/commit/{out['commit_oid']}")
    files = server.files("repblend-tester/tiny-set")
    assert set(files) == {".gitattributes", "README.md", "config.json", PARQUET, "images/synthetic_grid.png"}
    assert hashlib.sha256(files["images/synthetic_grid.png"]).hexdigest() == out["grid_sha256"]
    config = json.loads(files["config.json"])
    assert config["model_type"] == "repblend" and [config["inner_lr_img"], config["inner_lr_txt"]] == out["synced_lrs"]


@pytest.mark.hub
def test_served_readme_is_the_rendered_card(session):
    _, server, _ = session
    from huggingface_hub import DatasetCard

    readme = server.files("repblend-tester/tiny-set")["README.md"].decode()
    card = DatasetCard(readme)
    assert card.data.tags == ["dataset-distillation", "repblend", "multimodal", "image-text-retrieval", "fashion"]
    assert card.data.license == "mit" and card.data.source_datasets == ["fashion-scenes"]
    assert card.data.configs == [{"config_name": "default", "data_files": [{"split": "train",
                                                                             "path": "data/train-*"}]}]
    assert "| method | pairs | IR@1 | IR@5 | IR@10 | TR@1 | TR@5 | TR@10 | r_mean |" in readme
    assert "| **repblend (this set)** | 6 | 10.0 ± 0.5 | 11.0 ± 0.5 |" in readme
    assert "| random | 6 | 2.0 ± 0.5 |" in readme
    assert "| repblend | 6 | 0.250 ± 0.010 | 0.500 ± 0.020 | 0.750 ± 0.030 |" in readme  # diagnostics
    assert "![The synthetic images](images/synthetic_grid.png)" in readme
    assert 'SyntheticSet.from_hub("repblend-tester/tiny-set")' in readme
    assert "journal = {arXiv preprint arXiv:2505.14705}" in readme


@pytest.mark.hub
def test_stand_in_answers_the_other_client_calls(session):
    out, server, _ = session
    assert out["whoami"] == "repblend-tester"
    assert out["paths_info"] == ["RepoFile:config.json", "RepoFolder:data"]
    assert out["commits"] == server.history("repblend-tester/tiny-set")
    assert out["branches"] == [["main", out["commit_oid"]]]
    assert out["ranged_read"] == server.files("repblend-tester/tiny-set")["config.json"][4:16].decode()


@pytest.mark.hub
def test_expert_trajectories_round_trip(session):
    out, server, _ = session
    assert out["trajectories_indices"] == [0, 1]
    assert out["trajectories_metadata_equal"] and out["trajectories_exact"]
    files = server.files("repblend-tester/tiny-experts")
    assert set(files) == {".gitattributes", "README.md", "trajectories.json", "expert_000.safetensors",
                          "expert_001.safetensors"}
    assert server.history("repblend-tester/tiny-experts")[0] == out["trajectories_oid"]
    assert "expert-trajectories" in files["README.md"].decode()


@pytest.mark.hub
def test_repo_that_is_not_a_distilled_set_gets_a_clear_error(session):
    out, _, _ = session
    expected = "repblend-tester/tiny-experts is not a repblend_hf distilled set: no config.json with model_type " \
               "'repblend'"
    assert out["not_a_set_from_hub"].startswith(expected)
    assert out["not_a_set_config_from_hub"].startswith(expected)


@pytest.mark.hub
def test_token_never_appears_in_output_or_on_the_server(session):
    out, server, proc = session
    assert "Authorization" in proc.stderr or "authorization" in proc.stderr  # HF_DEBUG did log requests
    assert TEST_TOKEN not in proc.stdout + proc.stderr
    assert all(TEST_TOKEN.encode() not in p.read_bytes() for p in server.root.rglob("*") if p.is_file())


@pytest.mark.hub
def test_failed_push_leaves_repo_at_previous_revision_and_local_set_intact(hub):
    proc = hub.run(FAILED_PUSH, env={"HF_DEBUG": "1"})
    out = _result(proc)
    assert TEST_TOKEN not in proc.stdout + proc.stderr
    lfs_error, commit_error = out["errors"]
    for error in (lfs_error, commit_error):
        assert error.startswith("push to repblend-tester/flaky failed: ")
        assert f"Nothing was committed: the repo is unchanged at revision {out['v1']}" in error
        assert "this SyntheticSet in memory is untouched: retry the push, or keep it with save_pretrained" in error
    assert "Error while uploading 'data/train-00000-of-00001.parquet'" in lfs_error and "403" in lfs_error
    assert "500" in commit_error and "/commit/main" in commit_error
    assert out["local_intact"] and out["output_dir_intact"] and out["output_dir_loads"]
    assert out["served_is_v1"]  # what the stand-in served after both failures were the v1 files
    # Both failures happened where intended, and the retry then made exactly one new commit.
    failures = [(route, status) for _, _, route, status in hub.server.requests
                if route in ("lfs-upload", "commit") and status >= 400]
    assert failures == [("lfs-upload", 403), ("commit", 500)]
    history = hub.server.history("repblend-tester/flaky")
    assert len(history) == 3 and history[:2] == [out["retry"], out["v1"]]
    assert out["served_after_retry_is_v2"]


# ----- cards and templates (no server) -------------------------------------------------------------------------------


def _card_data(**overrides):
    from repblend_hf import RepBlendConfig
    from repblend_hf.hub import SyntheticSetCardData

    config = RepBlendConfig(num_pairs=6, image_size=8, text_dim=16, sim_rank=2, sim_alpha=2.0, lr_img=0.0625,
                            lr_txt=0.125, source_dataset="fashion-scenes").to_dict()
    results = [{"method": "repblend", "pairs": 6, "test": {m: {"mean": 20.0, "std": 1.25} for m in METRICS},
                "diagnostics": {k: {"mean": 0.5, "std": 0.125} for k in ("sim_image", "sim_text", "gap")},
                "set_diagnostics": {"sim_image": 0.25, "sim_text": 0.125, "gap": 0.75}},
               {"method": "herding", "pairs": 6, "test": {m: {"mean": 5.0, "std": 0.0} for m in METRICS}},
               {"method": "random", "pairs": 6, "test": {m: {"mean": 4.0, "std": 0.0} for m in METRICS},
                "set_diagnostics": {"sim_image": 0.0625, "sim_text": 0.0625, "gap": 0.5}},
               {"method": "full", "pairs": 40, "seeds": 1, "test": {m: {"mean": 50.0, "std": 0.0} for m in METRICS}}]
    kwargs = {"repo_id": "someone/set", "config": config, "results": results, "has_nearest_captions": True,
              "grid_image": "images/synthetic_grid.png", "metadata": {"pretty_name": "Tiny set"}}
    return SyntheticSetCardData(**{**kwargs, **overrides})


def test_synthetic_set_card_has_every_section():
    from repblend_hf.hub import render_synthetic_set_card

    card = render_synthetic_set_card(_card_data())
    text = str(card)
    assert card.data.pretty_name == "Tiny set" and card.data.license == "other"
    assert card.data.tags == ["dataset-distillation", "repblend", "multimodal", "image-text-retrieval"]
    assert card.data.size_categories == "n<1K" and card.data.source_datasets == ["fashion-scenes"]
    sections = ["# Tiny set", "## Contents", "## How to use it", "## Retrieval results", "### Modality diagnostics",
                "### Modality collapse on the set itself", "## The synthetic images", "## Configuration", "## License",
                "## Citation", "## Framework versions"]
    positions = [text.index(s) for s in sections]
    assert positions == sorted(positions)
    assert "| `similarity_left` | float32 [2] |" in text and "| `nearest_caption` | string |" in text
    assert 'load_dataset("someone/set", split="train")' in text and 'RepBlendConfig.from_hub("someone/set")' in text
    assert "repblend-evaluate --method distilled --distilled_set someone/set" in text  # the installed command
    assert "| **repblend (this set)** | 6 |" + " 20.0 ± 1.2 |" * 7 in text  # Python's round-half-even
    assert "| herding | 6 |" + " 5.0 ± 0.0 |" * 7 in text
    assert "| full | 40 |" + " 50.0 |" * 7 in text  # one seed: the mean alone
    assert "| repblend | 6 | 0.500 ± 0.125 | 0.500 ± 0.125 | 0.500 ± 0.125 |" in text
    assert "| herding |" not in text.split("### Modality diagnostics")[1]  # no diagnostics, no row
    on_set = text.split("### Modality collapse on the set itself")[1].split("##")[0]
    assert "| repblend (6 pairs), this set | 0.250 | 0.125 | 0.750 |" in on_set
    assert "| random (6 pairs), random real subset | 0.062 | 0.062 | 0.500 |" in on_set and "herding" not in on_set
    assert "| `pixel_values` | float32 [3, 8, 8] |" in text and "| synthetic images | pixels |" in text
    assert "low rank: S = diag(a) + (α/r)·L·Rᵀ, a of length 6, L and R of shape 6×2 (r = 2, α = 2.0)" in text
    assert "| learned inner learning rate η (image head) | 0.0625 |" in text
    assert "| learned inner learning rate η (text head) | 0.125 |" in text
    assert "author  = {Zhang, Xin and Zhang, Ziruo and Du, Jiawei and Liu, Zuozhu and Zhou, Joey Tianyi}" in text
    for name in ("repblend_hf", "torch", "transformers", "datasets", "huggingface_hub"):
        assert f"\n- {name}: " in text


def test_set_collapse_table_reads_the_set_against_its_recorded_real_subset_without_a_random_baseline():
    from repblend_hf.hub import render_synthetic_set_card

    data = _card_data()
    data.results = [{**data.results[0], "real_subset_diagnostics": {"sim_image": 0.125, "sim_text": 0.0625,
                                                                     "gap": 0.25}}]
    on_set = str(render_synthetic_set_card(data)).split("### Modality collapse on the set itself")[1].split("##")[0]
    assert "| repblend (6 pairs), this set | 0.250 | 0.125 | 0.750 |" in on_set
    assert "| random real subset (6 pairs) | 0.125 | 0.062 | 0.250 |" in on_set
    # With a random-coreset row present, that row is the comparison and the recorded subset is not repeated.
    data.results = _card_data().results
    data.results[0]["real_subset_diagnostics"] = {"sim_image": 0.125, "sim_text": 0.0625, "gap": 0.25}
    on_set = str(render_synthetic_set_card(data)).split("### Modality collapse on the set itself")[1].split("##")[0]
    rows = [line for line in on_set.splitlines() if line.startswith("|")]  # the table, not the text above it
    assert sum("random real subset" in line for line in rows) == 1


def test_feature_space_card_says_which_encoder_its_features_belong_to():
    from repblend_hf import RepBlendConfig
    from repblend_hf.hub import render_synthetic_set_card

    config = RepBlendConfig(num_pairs=6, image_size=8, text_dim=16, sim_rank=2, synthetic_space="features").to_dict()
    text = str(render_synthetic_set_card(_card_data(config=config)))
    assert "**This set lives in `tf_efficientnet_lite0`'s feature space.**" in text
    assert "does not transfer to another image encoder" in text
    assert "| `image_features` | float32 [1280] |" in text and "pixel_values" not in text


def test_card_without_results_or_grid_leaves_those_sections_out():
    from repblend_hf.hub import render_synthetic_set_card

    text = str(render_synthetic_set_card(_card_data(results=None, grid_image=None, has_nearest_captions=False)))
    for absent in ("## Retrieval results", "### Modality diagnostics", "## The synthetic images", "nearest_caption"):
        assert absent not in text
    assert "## Configuration" in text and "## Citation" in text


def test_card_says_how_a_no_blend_or_lors_set_was_made(tmp_path):
    from repblend_hf import RepBlendConfig
    from repblend_hf.hub import render_synthetic_set_card
    from repblend_hf.training_args import DistillationArguments

    text = str(render_synthetic_set_card(_card_data()))
    assert "| representation blending |" not in text and "| outer iterations |" not in text  # nothing recorded
    for method, explicit, says in (
            ("repblend", {"blend_beta": 0.0}, ["| method | `repblend` |", "| representation blending | none (β = 0) |",
                                               "| matching | symmetric (both projection heads) |"]),
            ("repblend", {}, ["| representation blending | λ ~ Beta(β, β), β = 1.0 |"]),
            ("lors", {}, ["| method | `lors` |", "| representation blending | none (β = 0) |",
                          "| matching | asymmetric (the image encoder and the text head) |",
                          "| inner loss, meta-gradient | wbce, tesla |"])):
        args = DistillationArguments(output_dir=str(tmp_path), method=method, report_to="none", **explicit)
        config = RepBlendConfig(method=method, matching=args.matching, image_dim=16, embed_dim=16, num_pairs=6,
                                sim_rank=2).record_distillation(args, iterations=300)
        text = str(render_synthetic_set_card(_card_data(config=config.to_dict())))
        for line in says + ["| outer iterations | 300 |",
                            "| expert segments | 8 inner steps against 1 expert epoch(s), start epoch < 2 |"]:
            assert line in text, line


def test_card_says_what_an_asymmetric_set_was_distilled_for():
    from repblend_hf import RepBlendConfig
    from repblend_hf.hub import render_synthetic_set_card

    assert "| distilled for |" not in str(render_synthetic_set_card(_card_data()))  # RepBlend: the heads
    for head, says in ((False, "the image encoder (its pooled feature is the image embedding) and the text head"),
                       (True, "the image encoder with an image head and the text head")):
        config = RepBlendConfig(method="lors", matching="asymmetric", asymmetric_image_head=head, image_dim=16,
                                embed_dim=16, num_pairs=6, sim_rank=2).to_dict()
        text = str(render_synthetic_set_card(_card_data(config=config)))
        assert f"| distilled for | {says} (asymmetric matching, as LoRS / MTT-VL)" in text


def test_card_rejects_results_outside_the_schema():
    with pytest.raises(ValueError, match=r"results\[0\] lacks \[\"test\['r_mean'\]\"\]; pass records in the "
                                         r"results.json schema"):
        _card_data(results=[{"method": "x", "pairs": 6, "test": {m: {"mean": 1, "std": 0} for m in METRICS[:-1]}}])


def test_trajectories_card():
    from repblend_hf.hub import TrajectoriesCardData, render_trajectories_card

    meta = {"format_version": 1, "branch_sizes": {"image": 657920, "text": 459264}, "num_epochs": 10,
            "image_encoder": "tf_efficientnet_lite0", "dataset": "fashion-scenes"}
    card = render_trajectories_card(TrajectoriesCardData("someone/experts", meta, [0, 1, 2]))
    text = str(card)
    assert card.data.viewer is False and "expert-trajectories" in card.data.tags
    assert "| `expert_002.safetensors` | expert 2: one float32 tensor per branch, shaped [11, parameters] |" in text
    assert "| `image` | 657920 |" in text and "- image_encoder: `tf_efficientnet_lite0`" in text
    assert 'ExpertTrajectories.from_hub("someone/experts")' in text and "arXiv:2505.14705" in text


def test_card_templates_live_at_the_top_level_and_the_package_reads_them_there():
    """``hub_cards/`` is the templates' one home (DESIGN.md's layout); ``repblend_hf/hub_cards`` links to it, so the
    cards rendered in a checkout or an editable install come from the top-level files."""
    from repblend_hf.hub import _template_path

    home = REPO_ROOT / "hub_cards"
    assert sorted(p.name for p in home.glob("*.md")) == ["synthetic_set.md", "trajectories.md"]
    link = REPO_ROOT / "repblend_hf" / "hub_cards"
    assert link.is_symlink() and link.resolve() == home
    for name in ("synthetic_set.md", "trajectories.md"):
        with _template_path(name) as path:
            assert Path(path).resolve() == home / name


def test_card_templates_ship_in_the_wheel(tmp_path):
    """setup.cfg's package_data puts hub_cards/*.md and configs/*.yaml in the wheel, and its entry_points the
    console scripts (built from a copy of the checkout's layout, links kept, not the shared checkout). The wheel,
    installed into a folder of its own, renders both cards from the templates it carries."""
    pytest.importorskip("pip")
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "setup.cfg", "README.md"):
        shutil.copy(REPO_ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__")
    shutil.copytree(REPO_ROOT / "hub_cards", source / "hub_cards", ignore=ignore)
    shutil.copytree(REPO_ROOT / "repblend_hf", source / "repblend_hf", symlinks=True, ignore=ignore)
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                           str(tmp_path / "dist"), str(source)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("repblend_hf-*.whl")
    archive = zipfile.ZipFile(wheel)
    names = set(archive.namelist())
    assert {"repblend_hf/hub_cards/synthetic_set.md", "repblend_hf/hub_cards/trajectories.md"} <= names
    for name in ("synthetic_set.md", "trajectories.md"):  # the files themselves, not a link
        assert archive.read(f"repblend_hf/hub_cards/{name}") == (REPO_ROOT / "hub_cards" / name).read_bytes()
    # The commands and the embedded default's config ship too, with their console scripts.
    assert {"repblend_hf/commands/distill.py", "repblend_hf/commands/evaluate.py",
            "repblend_hf/configs/fashion_scenes_99.yaml"} <= names
    (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    scripts = {line.split("=")[0].strip(): line.split("=")[1].strip()
               for line in archive.read(entry_points).decode().splitlines() if "=" in line}
    assert scripts == {"repblend-distill": "repblend_hf.commands.distill:cli",
                       "repblend-evaluate": "repblend_hf.commands.evaluate:cli"}

    # Installed from the wheel (ahead of the editable install on the path), with no checkout in reach.
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target",
                           str(target), str(wheel)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    render = (
        "import pathlib, repblend_hf\n"
        "from repblend_hf.hub import _template_path\n"
        "from repblend_hf.commands.distill import DEFAULT_CONFIG\n"
        f"assert pathlib.Path(repblend_hf.__file__).is_relative_to({str(target)!r}), repblend_hf.__file__\n"
        "for name in ('synthetic_set.md', 'trajectories.md'):\n"
        "    with _template_path(name) as path:\n"
        f"        assert pathlib.Path(path).is_relative_to({str(target)!r}), path\n"
        "        print(name, len(pathlib.Path(path).read_text()))\n"
        "from repblend_hf.hub import TrajectoriesCardData, render_trajectories_card\n"
        "meta = {'format_version': 1, 'branch_sizes': {'image': 8, 'text': 4}, 'num_epochs': 2}\n"
        "print(render_trajectories_card(TrajectoriesCardData('someone/experts', meta, [0])))\n"
        "assert DEFAULT_CONFIG.is_file(), DEFAULT_CONFIG\n"
    )
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", render], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "synthetic_set.md" in proc.stdout and "trajectories.md" in proc.stdout
    assert 'ExpertTrajectories.from_hub("someone/experts")' in proc.stdout  # the card, rendered from the wheel


def test_evaluate_script_reads_a_folder_or_a_hub_repo_id(monkeypatch, tmp_path):
    import repblend_hf.commands.evaluate as module

    calls = []

    class Loaded(Exception):
        pass

    def loader(kind):
        def load(path, *args, **kwargs):
            calls.append((kind, str(path)))
            raise Loaded

        return load

    monkeypatch.setattr(module.SyntheticSet, "from_hub", loader("hub"))
    monkeypatch.setattr(module.SyntheticSet, "from_pretrained", loader("folder"))
    for path in ("someone/fashion-scenes-repblend-99", str(tmp_path)):
        with pytest.raises(Loaded):
            module.evaluate_distilled(path, None, [0], {})
    assert calls == [("hub", "someone/fashion-scenes-repblend-99"), ("folder", str(tmp_path))]


# ----- the stand-in itself, over raw HTTP ----------------------------------------------------------------------------


def _call(server, method, path, body=None, token=TEST_TOKEN, headers=None):
    request = urllib.request.Request(server.endpoint + path, method=method, data=body, headers=dict(headers or {}))
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_stand_in_commits_are_atomic_and_resolve_serves_heads_ranges_and_errors(tmp_path):
    with HubStandIn(tmp_path) as server:
        create = json.dumps({"name": "raw", "organization": "someone", "type": "dataset"}).encode()
        assert _call(server, "POST", "/api/repos/create", create, token=None)[0] == 401
        assert _call(server, "POST", "/api/repos/create", create, token="hf_wrong")[0] == 401
        assert _call(server, "POST", "/api/repos/create", create)[0] == 200
        status, _, body = _call(server, "POST", "/api/repos/create", create)
        assert status == 409 and json.loads(body)["url"] == f"{server.endpoint}/datasets/someone/raw"
        first = server.head("someone/raw")

        def commit(*operations, parent=None):
            header = {"summary": "test", "description": "", **({"parentCommit": parent} if parent else {})}
            lines = [{"key": "header", "value": header}, *operations]
            return _call(server, "POST", "/api/datasets/someone/raw/commit/main",
                         b"".join(json.dumps(x).encode() + b"\n" for x in lines))

        def add(path, content):
            return {"key": "file", "value": {"path": path, "encoding": "base64",
                                             "content": base64.b64encode(content).decode()}}

        # A commit with one invalid operation (an LFS object never uploaded) changes nothing.
        bad_lfs = {"key": "lfsFile", "value": {"path": "x.bin", "algo": "sha256", "oid": "0" * 64, "size": 3}}
        assert commit(add("a.txt", b"hello"), bad_lfs)[0] == 422 and server.head("someone/raw") == first
        assert commit(add("a.txt", b"hello"), parent="f" * 40)[0] == 412 and server.head("someone/raw") == first
        status, _, body = commit(add("a.txt", b"hello world"), parent=first)
        second = json.loads(body)["commitOid"]
        assert status == 200 and server.head("someone/raw") == second and server.history("someone/raw")[1] == first

        status, headers, body = _call(server, "HEAD", "/datasets/someone/raw/resolve/main/a.txt", token=None)
        assert status == 200 and body == b"" and headers["X-Repo-Commit"] == second
        assert headers["Content-Length"] == "11" and headers["ETag"].strip('"') == hashlib.sha1(
            b"blob 11\0hello world").hexdigest()
        status, headers, body = _call(server, "GET", "/datasets/someone/raw/resolve/main/a.txt",
                                      headers={"Range": "bytes=6-"})
        assert status == 206 and body == b"world" and headers["Content-Range"] == "bytes 6-10/11"
        assert _call(server, "GET", f"/datasets/someone/raw/resolve/{first}/a.txt")[1]["X-Error-Code"] == \
            "EntryNotFound"
        assert _call(server, "GET", "/datasets/someone/raw/resolve/nope/a.txt")[1]["X-Error-Code"] == \
            "RevisionNotFound"
        assert _call(server, "GET", "/api/datasets/someone/other")[1]["X-Error-Code"] == "RepoNotFound"
        # An LFS upload: the batch answer points at the server itself; a chunked PUT body is read too.
        oid = hashlib.sha256(b"blob!").hexdigest()
        batch = json.dumps({"operation": "upload", "objects": [{"oid": oid, "size": 5}]}).encode()
        status, _, body = _call(server, "POST", "/datasets/someone/raw.git/info/lfs/objects/batch", batch)
        href = json.loads(body)["objects"][0]["actions"]["upload"]["href"]
        assert status == 200 and href.startswith(server.endpoint + "/_lfs/upload/")
        connection = http.client.HTTPConnection(*urllib.parse.urlsplit(server.endpoint).netloc.split(":"))
        connection.request("PUT", href[len(server.endpoint):], body=iter([b"bl", b"ob!"]), encode_chunked=True)
        assert connection.getresponse().status == 200
        connection.close()
        lfs = {"key": "lfsFile", "value": {"path": "b.bin", "algo": "sha256", "oid": oid, "size": 5}}
        assert commit(lfs)[0] == 200 and server.files("someone/raw")["b.bin"] == b"blob!"

        server.inject_fault("resolve", status=503, after=1)
        assert _call(server, "GET", "/datasets/someone/raw/resolve/main/a.txt")[0] == 200
        assert _call(server, "GET", "/datasets/someone/raw/resolve/main/a.txt")[0] == 503
        assert _call(server, "GET", "/datasets/someone/raw/resolve/main/a.txt")[0] == 200

