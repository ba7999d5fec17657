"""Test settings: no network, and every cache inside pytest's temporary area.

HF_HUB_OFFLINE must be set before transformers / huggingface_hub / datasets are imported, which is
why it happens here, at import time of the conftest, not in a fixture.
"""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Keep datasets' cache out of the user's home; a session-wide folder so tests can share builds.
_CACHE = os.environ.setdefault("REPBLEND_TEST_CACHE", tempfile.mkdtemp(prefix="repblend-test-cache-"))
os.environ.setdefault("HF_DATASETS_CACHE", os.path.join(_CACHE, "datasets"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ----- tiny assets shared by the script and pipeline tests --------------------------------------------------

WORDS = ("a red blue green white bag shirt shoe dress coat at the top bottom left right of in picture "
         "next to two three items and on").split()
# The tiny images are tinted with one of these colours and their captions name it, so that retrieval on the tiny
# dataset has something to learn: a healthy pipeline scores above chance, a broken one (noise, shuffled pairs) not.
COLOURS = {"red": (200, 40, 40), "blue": (40, 60, 210), "green": (40, 190, 60), "white": (225, 225, 225)}
ITEMS = ("bag", "shirt", "shoe", "dress", "coat")
POSITIONS = ("top", "bottom", "left", "right")
TEMPLATES = ("a {colour} {item}", "{colour} {item} on the {position}", "the {colour} {item}")


def _caption(rng, colour: str) -> str:
    template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
    return template.format(colour=colour, item=ITEMS[int(rng.integers(len(ITEMS)))],
                           position=POSITIONS[int(rng.integers(len(POSITIONS)))])


def make_tiny_text_encoder(folder) -> None:
    """Write a 1-layer BERT with a word-level vocabulary (every caption word is a token) into ``folder``.

    transformers 5's ``BertTokenizerFast`` takes the vocabulary as ``vocab=`` (a ``vocab_file=`` is ignored, which
    once made every word ``[UNK]`` and every caption the same vector). With ``pooling="mean"`` captions that differ
    in a word get different embeddings, and the colour word is learnable from them (tests/test_robustness.py);
    the [CLS] output of a random BERT barely depends on the words.
    """
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    tokenizer = BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=64))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def make_tiny_karpathy(folder, sizes=(("train", 40), ("val", 12), ("test", 12))) -> None:
    """A Karpathy-style JSON folder of coloured 32×32 images; each caption names its image's colour."""
    import json

    import numpy as np
    from PIL import Image

    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    names = list(COLOURS)
    for split, n in sizes:
        rows = []
        colours = [names[int(c)] for c in rng.permutation(np.arange(n) % len(names))]  # balanced, shuffled
        for i, colour in enumerate(colours):
            name = f"images/{split}_{i}.png"
            pixels = np.clip(np.array(COLOURS[colour]) + rng.normal(0, 25, size=(32, 32, 3)), 0, 255)
            Image.fromarray(pixels.astype("uint8")).save(folder / name)
            captions = [_caption(rng, colour) for _ in range(2 + i % 2)]
            if split == "train":
                rows += [{"image": name, "caption": c, "image_id": f"{split}_{i}"} for c in captions]
            else:
                rows.append({"image": name, "caption": captions})
        (folder / f"{split}.json").write_text(json.dumps(rows))


@pytest.fixture(scope="session")
def tiny_text_encoder_dir(tmp_path_factory):
    """A 1-layer BERT with a word-level vocabulary, saved as a transformers model directory."""
    folder = tmp_path_factory.mktemp("tiny-bert")
    make_tiny_text_encoder(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_karpathy_dir(tmp_path_factory):
    """A Karpathy-style JSON folder: 40 train, 12 val, 12 test coloured 32×32 images with 2-3 captions each."""
    folder = tmp_path_factory.mktemp("tiny-karpathy")
    make_tiny_karpathy(folder)
    return folder
