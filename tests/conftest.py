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


def _caption(rng, i: int) -> str:
    words = [WORDS[int(j)] for j in rng.integers(0, len(WORDS), size=6)]
    return f"{' '.join(words)} {WORDS[i % len(WORDS)]}"


@pytest.fixture(scope="session")
def tiny_text_encoder_dir(tmp_path_factory):
    """A 2-layer BERT with a word-level vocabulary, saved as a transformers model directory."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    folder = tmp_path_factory.mktemp("tiny-bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(folder / "vocab.txt"))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=32, max_position_embeddings=64))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_karpathy_dir(tmp_path_factory):
    """A Karpathy-style JSON folder: 40 train, 12 val, 12 test coloured 32×32 images with 2-3 captions each."""
    import json

    import numpy as np
    from PIL import Image

    folder = tmp_path_factory.mktemp("tiny-karpathy")
    (folder / "images").mkdir()
    rng = np.random.default_rng(0)
    sizes = {"train": 40, "val": 12, "test": 12}
    for split, n in sizes.items():
        rows = []
        for i in range(n):
            name = f"images/{split}_{i}.png"
            pixels = (rng.random((32, 32, 3)) * 64 + rng.integers(0, 192, size=3)).astype("uint8")
            Image.fromarray(pixels).save(folder / name)
            captions = [_caption(rng, i) for _ in range(2 + i % 2)]
            if split == "train":
                rows += [{"image": name, "caption": c, "image_id": f"{split}_{i}"} for c in captions]
            else:
                rows.append({"image": name, "caption": captions})
        (folder / f"{split}.json").write_text(json.dumps(rows))
    return folder
