#!/usr/bin/env bash
# Push the embedded default's distilled set to the Hub stand-in (tests/hub_server.py, an API-compatible
# stand-in served on 127.0.0.1, not the Hub), read it back with load_dataset and SyntheticSet.from_hub,
# and evaluate it from its repo id with examples/evaluate.py. Run after `accelerate launch examples/distill.py`.
# Against the real Hub: drop the server and the HF_ENDPOINT line, log in with a token, use your namespace.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-outputs/fashion-scenes-repblend-99}
log=$(mktemp)
.venv/bin/python tests/hub_server.py > "$log" 2>&1 &
server=$!
trap 'kill $server' EXIT
until grep -q "Hub stand-in at" "$log"; do sleep 0.2; done
read -r endpoint token user < <(.venv/bin/python - "$log" <<'PY'
import re, sys
line = open(sys.argv[1]).read()
m = re.search(r"at (\S+) \(token '([^']+)', user '([^']+)'\)", line)
print(*m.groups())
PY
)
export HF_ENDPOINT=$endpoint HF_TOKEN=$token HF_HUB_DISABLE_XET=1 HF_HUB_OFFLINE=0
export HF_HUB_CACHE=$(mktemp -d)  # keep the stand-in's files out of your real Hub cache
repo="$user/fashion-scenes-repblend-99"

echo "\$ push $OUT/synthetic_set to $repo"
.venv/bin/python - "$OUT" "$repo" <<'PY'
import json, sys
from datasets import load_dataset
from repblend_hf import SyntheticSet
out, repo = sys.argv[1], sys.argv[2]
synthetic = SyntheticSet.from_pretrained(f"{out}/synthetic_set")
rows = load_dataset(f"{out}/synthetic_set", split="train")
records = [json.load(open(f"{out}/results.json")), *json.load(open(f"{out}/baselines.json"))["baselines"]]
commit = synthetic.push_to_hub(repo, nearest_captions=rows["nearest_caption"], results=records,
                               grid_image=f"{out}/synthetic_images.png",
                               mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # tf_efficientnet_lite0 normalisation
print("pushed revision", commit.oid)
hub_rows = load_dataset(repo, split="train")
print(hub_rows)
same = SyntheticSet.from_hub(repo)
print("bit-exact:", all(__import__("torch").equal(a, b) for a, b in
                         zip(synthetic.state_dict().values(), same.state_dict().values())))
from huggingface_hub import hf_hub_download
print("card:", hf_hub_download(repo, "README.md", repo_type="dataset"))
import shutil; shutil.copy(hf_hub_download(repo, "README.md", repo_type="dataset"), "docs/example_card.md")
PY
echo "\$ python examples/evaluate.py --method distilled --distilled_set $repo --seeds 3"
.venv/bin/python examples/evaluate.py --method distilled --distilled_set "$repo" --seeds 3 \
  --output_dir "$OUT/evaluate_from_hub" 2>/dev/null | tail -4
