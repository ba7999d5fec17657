"""The data module: the embedded fashion-scenes default, the Hub layouts (against local copies in the
same file layout), Karpathy JSON folders, column_mapping, and every error message."""

import json
import os
import subprocess
import sys
import time

import datasets
import numpy as np
import pytest
from PIL import Image as PILImage

from repblend_hf.data import FASHION_SCENES, HUB_LAYOUTS, load_image_text_dataset
from repblend_hf.data import fashion_scenes as fs

HAS_FASHION_MNIST = all(
    os.path.isfile(path)
    for part in ("train", "t10k")
    for path in fs.source._idx_paths(fs.DEFAULT_FASHION_MNIST_DIR, part)
)
needs_fashion_mnist = pytest.mark.skipif(
    not HAS_FASHION_MNIST,
    reason=f"Fashion-MNIST IDX files absent from {fs.DEFAULT_FASHION_MNIST_DIR} (Debian dataset-fashion-mnist)",
)
TINY = {"num_train": 40, "num_validation": 12, "num_test": 12}


def _check_schema(dataset: datasets.DatasetDict) -> None:
    assert list(dataset) == ["train", "validation", "test"]
    for split in dataset.values():
        assert isinstance(split.features["image"], datasets.Image)
        assert split.features["captions"] == datasets.List(datasets.Value("string"))
        assert split.features["image_id"] == datasets.Value("string")


# ----------------------------------------------------------------------------------------------
# fashion-scenes
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return load_image_text_dataset(FASHION_SCENES, **TINY)


@needs_fashion_mnist
def test_fashion_scenes_schema_and_splits(tiny):
    _check_schema(tiny)
    assert {split: len(ds) for split, ds in tiny.items()} == {"train": 40, "validation": 12, "test": 12}
    row = tiny["test"][0]
    assert row["image"].size == (64, 64) and row["image"].mode == "RGB"
    assert row["image_id"] == "test-00000"
    assert len(set(tiny["train"]["image_id"])) == 40
    for split in tiny.values():
        for captions, objects in zip(split["captions"], split["objects"]):
            assert len(captions) == 5 and len(set(captions)) == 5, captions
            assert 2 <= len(objects) <= 4
            assert len({o["position"] for o in objects}) == len(objects)


@needs_fashion_mnist
def test_fashion_scenes_captions_vary(tiny):
    captions = [c for split in tiny.values() for caps in split["captions"] for c in caps]
    assert len(set(captions)) == len(captions)
    # Many different sentence openings, not one template with slots.
    openings = {" ".join(c.split()[:2]).lower() for c in captions}
    assert len(openings) >= 40, sorted(openings)
    # Captions carry colour and position, not only the item.
    colours = {name for name, _, _ in fs.COLOURS} | {"violet", "turquoise"}
    assert np.mean([any(colour in c.lower() for colour in colours) for c in captions]) > 0.8


def test_caption_templates_are_many_and_distinct():
    """The caption generator alone (no Fashion-MNIST needed): many templates in use, 5 distinct each."""
    by_category = [np.arange(3)] * len(fs.CATEGORIES)
    full = {name for name, mentions_all, _ in fs.TEMPLATES if mentions_all}
    used = set()
    for i in range(300):
        rng = np.random.default_rng([1, i])
        scene = fs.scenes._sample_scene(rng, by_category)
        described = fs.describe_scene(scene, rng)
        assert len(described) == 5 and len({c for _, c in described}) == 5
        assert described[0][0] in full  # the first caption mentions every object
        used.update(name for name, _ in described)
    assert len(fs.TEMPLATES) >= 25
    assert len(used) >= len(fs.TEMPLATES) - 2, set(t[0] for t in fs.TEMPLATES) - used


@needs_fashion_mnist
def test_fashion_scenes_provenance(tiny):
    """Test scenes come only from t10k; train and validation from disjoint pools of the train images."""
    train_images, train_labels = fs.load_fashion_mnist("train")
    _, test_labels = fs.load_fashion_mnist("t10k")
    pools = fs.source_pools(len(train_labels), len(test_labels))
    labels = {"train": train_labels, "t10k": test_labels}
    seen = {}
    for split, ds in tiny.items():
        assert set(ds["source"]) == {pools[split][0]}
        indices = [o["source_index"] for objects in ds["objects"] for o in objects]
        assert set(indices) <= set(pools[split][1].tolist())
        for objects, source in zip(ds["objects"], ds["source"]):
            for o in objects:  # the recorded index points at a glyph of the recorded category
                assert fs.CATEGORIES[labels[source][o["source_index"]]] == o["category"]
        seen[split] = set(indices)
    assert pools["test"][0] == "t10k" and pools["train"][0] == pools["validation"][0] == "train"
    assert not set(pools["train"][1].tolist()) & set(pools["validation"][1].tolist())
    assert not seen["train"] & seen["validation"]


@needs_fashion_mnist
def test_fashion_scenes_deterministic(tmp_path):
    sizes = {"num_train": 6, "num_validation": 3, "num_test": 3}
    first = load_image_text_dataset(FASHION_SCENES, cache_dir=str(tmp_path / "a"), **sizes)
    second = load_image_text_dataset(FASHION_SCENES, cache_dir=str(tmp_path / "b"), **sizes)
    for split in first:
        a = first[split].cast_column("image", datasets.Image(decode=False))
        b = second[split].cast_column("image", datasets.Image(decode=False))
        assert a.to_list() == b.to_list()
    # Scene i depends on (seed, split, i) only: a small build is a prefix of a larger one.
    larger = load_image_text_dataset(
        FASHION_SCENES, cache_dir=str(tmp_path / "a"), num_train=8, num_validation=3, num_test=3
    )
    assert larger["train"]["captions"][:6] == first["train"]["captions"]


@needs_fashion_mnist
def test_fashion_scenes_second_load_is_a_cache_hit(tiny):
    start = time.perf_counter()
    again = load_image_text_dataset(FASHION_SCENES, **TINY)
    assert time.perf_counter() - start < 3.0
    assert again["train"].cache_files == tiny["train"].cache_files
    # A new process hashes the generator the same way and reuses the same files.
    code = (
        "from repblend_hf.data import load_image_text_dataset as f; "
        f"d = f('fashion-scenes', **{TINY!r}); print(d['train'].cache_files[0]['filename'])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=os.environ, check=True)
    assert out.stdout.strip().splitlines()[-1] == tiny["train"].cache_files[0]["filename"]
    assert "Generating" not in out.stderr


def test_fashion_scenes_cache_key_survives_the_subpackage_split():
    """``datasets`` hashes the generator by reference (module and name): it stays where it was before
    ``fashion_scenes.py`` became a subpackage, so builds made before the split remain cache hits."""
    from datasets.utils._dill import dumps

    assert fs._generate_scenes.__module__ == "repblend_hf.data.fashion_scenes"
    assert b"repblend_hf.data.fashion_scenes\x8c\x10_generate_scenes" in dumps(fs._generate_scenes)


def test_fashion_scenes_without_fashion_mnist(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dataset-fashion-mnist.*zalando-datasets/fashion_mnist"):
        load_image_text_dataset(
            FASHION_SCENES,
            fashion_mnist_dir=str(tmp_path / "empty"),
            cache_dir=str(tmp_path / "cache"),
            num_train=2,
            num_validation=1,
            num_test=1,
        )


def test_fashion_scenes_hub_fallback(tmp_path, monkeypatch):
    """Without the Debian files the glyphs come from the Hub dataset (here a stand-in of it)."""
    calls = []

    def fake_load_dataset(repo_id, split):
        calls.append((repo_id, split))
        labels = np.arange(30 if split == "test" else 60) % 10
        images = [PILImage.fromarray(np.full((28, 28), 40 + 20 * int(label), np.uint8)) for label in labels]
        return datasets.Dataset.from_dict({"image": images, "label": labels.tolist()})

    monkeypatch.setattr(fs.datasets, "load_dataset", fake_load_dataset)
    built = load_image_text_dataset(
        FASHION_SCENES,
        fashion_mnist_dir=str(tmp_path / "empty"),
        cache_dir=str(tmp_path / "cache"),
        num_train=3,
        num_validation=2,
        num_test=2,
    )
    assert sorted(set(calls)) == [(fs.FASHION_MNIST_HUB_REPO, "test"), (fs.FASHION_MNIST_HUB_REPO, "train")]
    assert set(built["test"]["source"]) == {"t10k"}
    for objects in built["test"]["objects"]:
        assert all(o["source_index"] < 30 and fs.CATEGORIES[o["source_index"] % 10] == o["category"] for o in objects)


def test_fashion_scenes_rejects_bad_sizes():
    with pytest.raises(ValueError, match="num_train must be a positive int"):
        load_image_text_dataset(FASHION_SCENES, num_train=0)


# ----------------------------------------------------------------------------------------------
# Local Karpathy / BLIP JSON folders
# ----------------------------------------------------------------------------------------------


def _write_png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    PILImage.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


def _write_karpathy(folder, names=("train.json", "val.json", "test.json"), prefix="images/"):
    for i, stem in enumerate(["a", "b", "c", "d", "e"]):
        _write_png(folder / "images" / f"{stem}.png", 40 * i)
    train = [
        {"image": f"{prefix}a.png", "caption": "a dark square", "image_id": "7"},
        {"image": f"{prefix}b.png", "caption": "a grey square", "image_id": "8"},
        {"image": f"{prefix}a.png", "caption": "black again", "image_id": "7"},
    ]
    val = [{"image": f"{prefix}c.png", "caption": ["c one", "c two"]}]
    test = [
        {"image": f"{prefix}d.png", "caption": ["d one"]},
        {"image": f"{prefix}e.png", "caption": ["e one", "e 2"]},
    ]
    for name, rows in zip(names, (train, val, test)):
        (folder / name).write_text(json.dumps(rows))


@pytest.mark.parametrize(
    "names",
    [
        ("train.json", "val.json", "test.json"),
        ("flickr30k_train.json", "flickr30k_val.json", "flickr30k_test.json"),
        ("coco_karpathy_train.json", "coco_karpathy_val.json", "coco_karpathy_test.json"),
    ],
)
def test_karpathy_json_folder(tmp_path, names):
    _write_karpathy(tmp_path, names)
    loaded = load_image_text_dataset(str(tmp_path), cache_dir=str(tmp_path / "cache"))
    _check_schema(loaded)
    assert loaded["train"]["image_id"] == ["7", "8"]
    assert loaded["train"]["captions"] == [["a dark square", "black again"], ["a grey square"]]
    assert loaded["validation"]["image_id"] == ["c"]  # derived from the file name
    assert loaded["test"]["captions"] == [["d one"], ["e one", "e 2"]]
    assert loaded["test"][1]["image"].getpixel((0, 0)) == (160, 160, 160)


def test_karpathy_json_image_root(tmp_path):
    _write_karpathy(tmp_path / "ann", prefix="")
    os.rename(tmp_path / "ann" / "images", tmp_path / "pictures")
    loaded = load_image_text_dataset(
        str(tmp_path / "ann"), image_root=str(tmp_path / "pictures"), cache_dir=str(tmp_path / "cache")
    )
    assert loaded["validation"][0]["image"].getpixel((0, 0)) == (80, 80, 80)


def test_karpathy_json_missing_image(tmp_path):
    _write_karpathy(tmp_path)
    os.remove(tmp_path / "images" / "e.png")
    with pytest.raises(FileNotFoundError, match=r"e\.png.*image_root"):
        load_image_text_dataset(str(tmp_path), cache_dir=str(tmp_path / "cache"))


def test_karpathy_json_unreadable_image(tmp_path):
    _write_karpathy(tmp_path)
    (tmp_path / "images" / "b.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"b\.png .*not a readable image"):
        load_image_text_dataset(str(tmp_path), cache_dir=str(tmp_path / "cache"))


def test_karpathy_json_missing_split(tmp_path):
    _write_karpathy(tmp_path)
    os.remove(tmp_path / "val.json")
    with pytest.raises(ValueError, match=r"none for the validation split.*val\.json"):
        load_image_text_dataset(str(tmp_path), cache_dir=str(tmp_path / "cache"))


# ----------------------------------------------------------------------------------------------
# Hub layouts, read from local copies in the same file layout
# ----------------------------------------------------------------------------------------------


def _images(n):
    return [PILImage.fromarray(np.full((8, 8, 3), (30 * i) % 256, np.uint8)) for i in range(n)]


def test_flickr30k_layout(tmp_path):
    """nlphuji/flickr30k's Parquet export: one "test" split, the Karpathy split in a column."""
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.List(datasets.Value("string")),
            "sentids": datasets.List(datasets.Value("string")),
            "split": datasets.Value("string"),
            "img_id": datasets.Value("string"),
            "filename": datasets.Value("string"),
        }
    )
    splits = ["train", "val", "test", "train", "test", "train"]
    rows = {
        "image": _images(6),
        "caption": [[f"caption {i}.{j}" for j in range(5)] for i in range(6)],
        "sentids": [[str(5 * i + j) for j in range(5)] for i in range(6)],
        "split": splits,
        "img_id": [str(i) for i in range(6)],
        "filename": [f"{1000 + i}.jpg" for i in range(6)],
    }
    (tmp_path / "TEST" / "test").mkdir(parents=True)
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "TEST" / "test" / "0000.parquet"))
    loaded = load_image_text_dataset(str(tmp_path), layout="flickr30k", cache_dir=str(tmp_path / "cache"))
    _check_schema(loaded)
    assert loaded["train"]["image_id"] == ["0", "3", "5"]
    assert loaded["validation"]["image_id"] == ["1"]
    assert loaded["test"]["captions"][1] == [f"caption 4.{j}" for j in range(5)]
    assert loaded["test"][1]["image"].getpixel((0, 0)) == (120, 120, 120)
    assert loaded.column_names["train"] == ["image", "captions", "image_id"]


def test_coco_layout(tmp_path):
    """bitmind/MS-COCO: Karpathy splits as files, one row per caption, grouped by cocoid."""
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "filepath": datasets.Value("string"),
            "sentids": datasets.List(datasets.Value("int32")),
            "filename": datasets.Value("string"),
            "imgid": datasets.Value("int32"),
            "split": datasets.Value("string"),
            "sentences": {
                "tokens": datasets.List(datasets.Value("string")),
                "raw": datasets.Value("string"),
                "imgid": datasets.Value("int32"),
                "sentid": datasets.Value("int32"),
            },
            "cocoid": datasets.Value("int32"),
        }
    )
    (tmp_path / "data").mkdir()
    for split, cocoids in {"train": [11, 11, 12, 11, 12], "validation": [21, 21], "test": [31, 32, 32]}.items():
        images = _images(40)
        rows = {
            "image": [images[c % 40] for c in cocoids],
            "filepath": ["val2014"] * len(cocoids),
            "sentids": [[0, 1]] * len(cocoids),
            "filename": [f"COCO_{c}.jpg" for c in cocoids],
            "imgid": cocoids,
            "split": [split] * len(cocoids),
            "sentences": [
                {"tokens": ["x"], "raw": f"{c} says {i}", "imgid": c, "sentid": i} for i, c in enumerate(cocoids)
            ],
            "cocoid": cocoids,
        }
        path = tmp_path / "data" / f"{split}-00000-of-00001.parquet"
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(path))
    loaded = load_image_text_dataset(str(tmp_path), layout="coco", cache_dir=str(tmp_path / "cache"))
    _check_schema(loaded)
    assert loaded["train"]["image_id"] == ["11", "12"]
    assert loaded["train"]["captions"] == [["11 says 0", "11 says 1", "11 says 3"], ["12 says 2", "12 says 4"]]
    assert loaded["test"]["captions"] == [["31 says 0"], ["32 says 1", "32 says 2"]]
    assert loaded["validation"][0]["image"].getpixel((0, 0)) == ((30 * 21) % 256,) * 3


def test_registry_points_at_hub_repos():
    assert HUB_LAYOUTS["flickr30k"].repo_id == "nlphuji/flickr30k"
    assert HUB_LAYOUTS["coco"].repo_id == "bitmind/MS-COCO"


# ----------------------------------------------------------------------------------------------
# Generic datasets + column_mapping, and the error messages
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def generic_folder(tmp_path):
    """A local Parquet dataset with its own column names and a single caption string per row."""
    features = datasets.Features(
        {"img": datasets.Image(), "sentences": datasets.Value("string"), "uid": datasets.Value("int64")}
    )
    folder = tmp_path / "generic"
    folder.mkdir()
    for split, n in {"train": 3, "validation": 2, "test": 2}.items():
        rows = {"img": _images(n), "sentences": [f"{split} text {i}" for i in range(n)], "uid": list(range(n))}
        datasets.Dataset.from_dict(rows, features=features).to_parquet(str(folder / f"{split}.parquet"))
    return folder


def test_column_mapping(generic_folder, tmp_path):
    loaded = load_image_text_dataset(
        str(generic_folder),
        column_mapping={"img": "image", "sentences": "captions", "uid": "image_id"},
        cache_dir=str(tmp_path / "cache"),
    )
    _check_schema(loaded)
    assert loaded["train"]["captions"] == [["train text 0"], ["train text 1"], ["train text 2"]]
    assert loaded["test"]["image_id"] == ["0", "1"]
    assert loaded["train"][2]["image"].getpixel((0, 0)) == (60, 60, 60)
    # Without an id column, the row number is the id.
    no_ids = load_image_text_dataset(
        str(generic_folder),
        column_mapping={"img": "image", "sentences": "captions"},
        cache_dir=str(tmp_path / "cache"),
    )
    assert no_ids["validation"]["image_id"] == ["validation-0", "validation-1"]


def test_missing_column_names_it_and_the_fix(generic_folder, tmp_path):
    with pytest.raises(
        ValueError,
        match=r"column 'captions' .*columns present: \['img', 'sentences', 'uid'\].*"
        r"column_mapping=",
    ):
        load_image_text_dataset(str(generic_folder), column_mapping={"img": "image"}, cache_dir=str(tmp_path / "c"))


def test_column_mapping_direction_is_checked(generic_folder, tmp_path):
    with pytest.raises(ValueError, match="column_mapping maps source columns to schema columns"):
        load_image_text_dataset(str(generic_folder), column_mapping={"image": "img"}, cache_dir=str(tmp_path / "c"))


def test_missing_validation_split(generic_folder, tmp_path):
    os.remove(generic_folder / "validation.parquet")
    with pytest.raises(ValueError, match=r"missing: \['validation'\].*never invented"):
        load_image_text_dataset(
            str(generic_folder),
            column_mapping={"img": "image", "sentences": "captions"},
            cache_dir=str(tmp_path / "c"),
        )


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match=r"Unknown dataset 'flickr' \(did you mean 'flickr30k'\?\).*'fashion-scenes'"):
        load_image_text_dataset("flickr")


def test_hub_layout_offline_says_how_to_use_a_local_copy():
    with pytest.raises(ValueError, match=r"Could not load 'nlphuji/flickr30k' for layout 'flickr30k'.*layout="):
        load_image_text_dataset("flickr30k")


def test_unknown_layout(tmp_path):
    with pytest.raises(ValueError, match=r"Unknown layout 'flickr'; registered layouts: \['coco', 'flickr30k'\]"):
        load_image_text_dataset(str(tmp_path), layout="flickr")
