"""Image-text datasets in one schema (DESIGN.md, "Schema of an image-text dataset").

:func:`load_image_text_dataset` returns a ``datasets.DatasetDict`` with splits train / validation /
test and columns ``image``, ``captions`` (list of str) and ``image_id`` (str), from the embedded
default :data:`FASHION_SCENES`, Flickr30K / COCO on the Hub (:data:`HUB_LAYOUTS`), a local folder
with Karpathy-style JSON, or any dataset ``datasets.load_dataset`` reads plus a ``column_mapping``.
"""

from .fashion_scenes import FASHION_SCENES
from .karpathy_json import KARPATHY_JSON_FILES
from .loading import HUB_LAYOUTS, HubLayout, load_image_text_dataset
from .schema import SCHEMA_FEATURES, SPLITS

__all__ = [
    "FASHION_SCENES",
    "HUB_LAYOUTS",
    "KARPATHY_JSON_FILES",
    "SCHEMA_FEATURES",
    "SPLITS",
    "HubLayout",
    "load_image_text_dataset",
]
