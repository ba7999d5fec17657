"""Run one outer iteration of the authors' released distillation script on a case from ``equivalence.py``.

    .venv/bin/python benchmarks/_authors_harness.py --method repblend --checkout /tmp/authors/RepBlend \
        --case CASE_DIR --out OUT_DIR

Called by ``benchmarks/equivalence.py`` in a process of its own (the adaptations below patch modules and torch
for the whole process). ``--checkout`` is the authors' code, never a copy of it in this repository: RepBlend's
``distill_repblend.py``, LoRS's ``distill_tesla_lors.py`` or MTT-VL's ``distill.py`` runs unchanged, its
``main(args)`` with the released command line's arguments and ``--Iteration 0`` (one outer iteration). What it reads
(the synthetic set, the similarity parameters, the expert snapshots, the tiny image encoder's weights) comes from
``CASE_DIR``; what it did (its random draws, the matching loss and the gradient the optimiser step received on every
learnable tensor) goes to ``OUT_DIR/authors.safetensors`` and ``OUT_DIR/authors.json``.

The adaptations, each the least that lets the script run on a CPU without its data, BERT, wandb or CUDA (the list
that ``equivalence.py`` writes into its report is :data:`ADAPTATIONS`):
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

ADAPTATIONS = [
    "CUDA → CPU: `Tensor.to`, `Module.to`, `Tensor.cuda` and `Module.cuda` map the device 'cuda' to 'cpu' (the "
    "scripts move the student and its heads to 'cuda' unconditionally).",
    "Modules that are not installed and that the iteration never calls are stubs: `wandb` (its `log` calls are "
    "recorded: that is where the scripts report the matching loss), `clip`, `cv2`, `kornia`.",
    "BERT is never loaded: `BertTokenizer/BertModel.from_pretrained` (MTT-VL's networks.py loads them at import) "
    "return a 2-layer random BERT, and `TextEncoder` is a stub (the distillation step takes text embeddings).",
    "Data: `get_dataset*` returns an empty training set, `load_or_process_file` returns one zero caption "
    "embedding, and the synthetic set's initialiser (`get_random_images_texts` / `get_images_texts`) returns the "
    "case's images and text embeddings instead of real pairs.",
    "The image encoder: `load_from_timm` (RepBlend) or `timm.create_model` inside `ImageEncoder` (LoRS, MTT-VL) "
    "gives the case's tiny random-weight timm encoder; `CLIPModel_full` keeps its structure but sizes its heads "
    "from that encoder's feature width (its name table only knows nfnet = 2304 and a few others) and builds them "
    "with the case's dropout (0 in the main cases; the dropout check uses the released 0.1).",
    "Dropout (the dropout check only): `torch.nn.functional.dropout` draws its masks, Bernoulli(1 − p) / (1 − p) as "
    "torch's, from a generator of its own and records them, so that this library can be handed the same masks and "
    "the mini-batches and blends drawn from the global generator stay those of the run without dropout.",
    "The low-rank similarity is built as released and then loaded with the case's parameters (R ≠ 0, so that L "
    "gets a gradient too).",
    "Experts: one buffer file in the released format (a list of experts, each a list of epochs, each a list of "
    "parameter tensors) written from the case's snapshots.",
    "Evaluation at iteration 0 (MTT-VL evaluates at iteration 0 whatever `--eval_it`) is a stub; RepBlend and "
    "LoRS run with `--eval_it 0` (no evaluation).",
    "The script file runs unchanged: its module body is executed, the names above are replaced in its namespace, "
    "then its `if __name__ == '__main__':` block runs with the command line given here.",
    "Recording only: `torch.randperm`, `numpy.random.randint` and `torch.distributions.Beta.sample` are wrapped to "
    "record the random draws (values unchanged), `torch.optim.SGD.step` records the gradients it is given and "
    "`MultilabelContrastiveLoss.forward` the inner losses it returns.",
]

__doc__ += "\n" + "\n".join(f"- {a}" for a in ADAPTATIONS) + "\n"

SCRIPTS = {"repblend": "distill_repblend.py", "lors": "distill_tesla_lors.py", "mtt_vl": "distill.py"}


def _device_to_cpu() -> None:
    """Map every 'cuda' device the scripts name to 'cpu'."""

    def fix(args, kwargs):
        args = tuple("cpu" if (isinstance(a, str) and a.startswith("cuda")) or
                     (isinstance(a, torch.device) and a.type == "cuda") else a for a in args)
        if "device" in kwargs and str(kwargs["device"]).startswith("cuda"):
            kwargs["device"] = "cpu"
        return args, kwargs

    tensor_to, module_to = torch.Tensor.to, nn.Module.to

    def t_to(self, *args, **kwargs):
        args, kwargs = fix(args, kwargs)
        return tensor_to(self, *args, **kwargs)

    def m_to(self, *args, **kwargs):
        args, kwargs = fix(args, kwargs)
        return module_to(self, *args, **kwargs)

    torch.Tensor.to, nn.Module.to = t_to, m_to
    torch.Tensor.cuda = lambda self, *a, **k: self
    nn.Module.cuda = lambda self, *a, **k: self


class _Recorder:
    """What the script did: wandb logs, random draws in call order, the gradients its optimisers stepped with."""

    def __init__(self):
        self.logs: dict[str, float] = {}
        self.randperm: list[tuple[int, torch.Tensor]] = []
        self.randint: list[int] = []
        self.beta: list[float] = []
        self.steps: list[list[list[torch.Tensor]]] = []  # per optimiser step: per group, the params' grads
        self.inner_losses: list[float] = []  # each call of the soft-label loss (the inner steps, then recomputed)
        self.masks: list[torch.Tensor] = []  # each dropout mask, in call order (forward steps, then recomputed)

    def install(self) -> None:
        randperm = torch.randperm

        def recorded_randperm(n, *args, **kwargs):
            out = randperm(n, *args, **kwargs)
            self.randperm.append((int(n), out.clone()))
            return out

        torch.randperm = recorded_randperm
        randint = np.random.randint

        def recorded_randint(*args, **kwargs):
            out = randint(*args, **kwargs)
            self.randint.append(int(out))
            return out

        np.random.randint = recorded_randint
        beta_sample = torch.distributions.Beta.sample

        def recorded_beta(dist, *args, **kwargs):
            out = beta_sample(dist, *args, **kwargs)
            self.beta.append(float(out))
            return out

        torch.distributions.Beta.sample = recorded_beta
        step = torch.optim.SGD.step
        recorder = self

        def recorded_step(opt, *args, **kwargs):
            recorder.steps.append([[None if p.grad is None else p.grad.detach().clone() for p in g["params"]]
                                   for g in opt.param_groups])
            return step(opt, *args, **kwargs)

        torch.optim.SGD.step = recorded_step

    def install_dropout(self, seed: int) -> None:
        """Dropout masks from a generator of their own (Bernoulli(1 − p) / (1 − p), as torch's), recorded: the same
        distribution, but the global generator (the mini-batches, the blends) is not consumed by them."""
        functional = torch.nn.functional
        dropout = functional.dropout
        generator = torch.Generator().manual_seed(seed)

        def recorded_dropout(input, p=0.5, training=True, inplace=False):
            if not training or p == 0:
                return dropout(input, p, training, inplace)
            mask = (torch.rand(input.shape, generator=generator) < 1 - p).to(input.dtype) / (1 - p)
            self.masks.append(mask.clone())
            return input * mask

        functional.dropout = recorded_dropout

    def install_loss(self, loss_class) -> None:
        forward = loss_class.forward

        def recorded_forward(module, *args, **kwargs):
            out = forward(module, *args, **kwargs)
            self.inner_losses.append(float(out.detach()))
            return out

        loss_class.forward = recorded_forward


def _stub_modules(recorder: _Recorder) -> None:
    """Stubs for packages the iteration never calls (and wandb, whose log calls carry the loss)."""
    import transformers

    transformers.BertModel  # noqa: B018 - import BERT (and accelerate, which probes for wandb) before the stubs
    wandb = types.ModuleType("wandb")

    def log(values, step=None, **_):
        for k, v in values.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                recorder.logs[k] = float(v)
            elif isinstance(v, (int, float)):
                recorder.logs[k] = float(v)

    wandb.init = lambda *a, **k: None
    wandb.log = log
    wandb.finish = lambda *a, **k: None
    wandb.Image = wandb.Html = wandb.Histogram = lambda *a, **k: None
    wandb.run = types.SimpleNamespace(name="equivalence")
    sys.modules["wandb"] = wandb
    for name in ("clip", "cv2", "kornia"):
        sys.modules[name] = types.ModuleType(name)
    tiny = transformers.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                   intermediate_size=32)
    transformers.BertModel.from_pretrained = classmethod(lambda cls, *a, **k: transformers.BertModel(tiny))
    transformers.BertTokenizer.from_pretrained = classmethod(lambda cls, *a, **k: None)


def _release_args(method: str, case: dict, buffer_dir: Path) -> list[str]:
    """The released Flickr-100 command line of the method, with the case's sizes and ``--Iteration 0``."""
    common = ["--dataset", "flickr", "--buffer_path", str(buffer_dir), "--image_encoder", "nfnet",
              "--text_encoder", "bert", "--syn_steps", str(case["syn_steps"]), "--expert_epochs",
              str(case["expert_epochs"]), "--max_start_epoch", str(case["max_start_epoch"]),
              "--lr_teacher_img", str(case["lr_init"]), "--lr_teacher_txt", str(case["lr_init"]),
              "--num_queries", str(case["num_pairs"]), "--mini_batch_size", str(case["mini_batch_size"]),
              "--Iteration", "0"]
    if method in ("repblend", "lors"):
        # scripts/distill_flickr_repblend.sh and sh/distill_flickr_lors_100.sh
        common += ["--lr_img", "100", "--lr_txt", "100", "--lr_lr", "1e-2", "--lr_sim", "10.0", "--sim_type",
                   "lowrank", "--sim_rank", str(case["sim_rank"]), "--alpha", str(case["sim_alpha"]),
                   "--loss_type", "WBCE", "--name", "equivalence", "--eval_it", "0"]
        if method == "repblend":
            common += ["--alpha_2", str(case["blend_beta"]), "--disabled_wandb", "1"]
            if case.get("merge_loss_branches"):  # the COCO scripts' joint normalisation
                common.append("--merge_loss_branches")
        else:
            common += ["--dsa", "False"]
    else:  # the multimodal_dataset_distillation README's command
        common += ["--lr_img", "1000", "--lr_txt", "1000", "--lr_lr", "1e-02", "--draw", "", "--std", ""]
    return common


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", choices=sorted(SCRIPTS), required=True)
    parser.add_argument("--checkout", required=True)
    parser.add_argument("--case", required=True)
    parser.add_argument("--out", required=True)
    opts = parser.parse_args()

    from safetensors.torch import load_file, save_file

    checkout, case_dir, out = Path(opts.checkout).resolve(), Path(opts.case), Path(opts.out)
    out.mkdir(parents=True, exist_ok=True)
    case = json.loads((case_dir / "case.json").read_text())
    tensors = load_file(str(case_dir / "case.safetensors"))
    torch.set_num_threads(1)
    torch.manual_seed(case["authors_seed"])
    np.random.seed(case["authors_seed"])

    recorder = _Recorder()
    _device_to_cpu()
    _stub_modules(recorder)

    import timm

    def tiny_encoder(*_, **__) -> nn.Module:
        model = timm.create_model(case["image_encoder"], pretrained=False, num_classes=0)
        model.load_state_dict({k.removeprefix("encoder."): v for k, v in tensors.items() if k.startswith("encoder.")})
        return model

    # The experts, in the released buffer format: experts x epochs x parameter tensors.
    buffer_dir = out / "buffer"
    buffer_dir.mkdir(exist_ok=True)
    shapes = case["branch_shapes"]
    for branch, prefix in (("image", "img"), ("text", "txt")):
        snapshots = tensors[f"expert.{branch}"]
        sizes = [int(np.prod(s)) for s in shapes[branch]]
        epochs = [[t.view(s).clone() for t, s in zip(row.split(sizes), shapes[branch])] for row in snapshots]
        torch.save([epochs], buffer_dir / f"{prefix}_replay_buffer_0.pt")

    sys.path.insert(0, str(checkout))
    script = checkout / SCRIPTS[opts.method]
    tree = ast.parse(script.read_text(), filename=str(script))
    main_block = [n for n in tree.body if isinstance(n, ast.If) and "__main__" in ast.unparse(n.test)]
    body = [n for n in tree.body if n not in main_block]
    namespace: dict = {"__name__": "authors_distill", "__file__": str(script)}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(script), "exec"), namespace)

    # --- the adaptations (ADAPTATIONS) ---------------------------------------------------------------------------
    networks = sys.modules.get("src.networks") or sys.modules["networks"]
    width, dropout = case["image_dim"], case["dropout"]

    class TextEncoderStub(nn.Module):
        def __init__(self, *args, **kwargs):
            super().__init__()

    networks.TextEncoder = TextEncoderStub
    if hasattr(networks, "load_from_timm"):
        networks.load_from_timm = tiny_encoder
    networks.timm = types.SimpleNamespace(create_model=tiny_encoder)
    original = namespace["CLIPModel_full"]

    class CLIPModelForCase(original):
        def __init__(self, args, *a, **k):
            super().__init__(args, *a, **k)
            if hasattr(self, "image_projection"):
                self.image_projection = networks.ProjectionHead(width, width, dropout=dropout)
            self.text_projection = networks.ProjectionHead(self.text_embedding, width, dropout=dropout)

    namespace["CLIPModel_full"] = CLIPModelForCase

    class TrainSetStub:
        def get_all_captions(self):
            return ["a caption"]

    def get_dataset(args):
        return None, None, TrainSetStub(), None

    for name in ("get_dataset", "get_dataset_flickr"):
        if name in namespace:
            namespace[name] = get_dataset
    namespace["load_or_process_file"] = lambda *a, **k: {"bert_test_embed": np.zeros((1, 768), dtype=np.float32)}

    def initial_set(*args, **kwargs):
        return tensors["images"].clone(), tensors["texts"].clone()

    for name in ("get_random_images_texts", "get_images_texts"):
        if name in namespace:
            namespace[name] = initial_set
    if "evaluate_synset" in namespace:  # MTT-VL evaluates at iteration 0
        namespace["evaluate_synset"] = lambda *a, **k: (None, 0.0, {k: 0.0 for k in (
            "img_r1", "img_r5", "img_r10", "img_r_mean", "txt_r1", "txt_r5", "txt_r10", "txt_r_mean", "r_mean")})
    if "LowRankSimilarityGenerator" in namespace:
        released = namespace["LowRankSimilarityGenerator"]

        class SimilarityForCase(released):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.load_params([nn.Parameter(tensors[f"similarity.{k}"].clone()) for k in ("diag", "left", "right")])

        namespace["SimilarityForCase"] = SimilarityForCase
        namespace["LowRankSimilarityGenerator"] = SimilarityForCase

    recorder.install()
    if dropout:
        recorder.install_dropout(case["authors_seed"])
    if "MultilabelContrastiveLoss" in namespace:
        recorder.install_loss(namespace["MultilabelContrastiveLoss"])
    sys.argv = [str(script), *_release_args(opts.method, case, buffer_dir)]
    exec(compile(ast.Module(body=main_block[0].body, type_ignores=[]), str(script), "exec"), namespace)

    # --- what it did ---------------------------------------------------------------------------------------------
    record = {"method": opts.method, "logs": recorder.logs, "start_epoch": recorder.randint,
              "inner_losses": recorder.inner_losses,
              "beta": recorder.beta, "randperm_sizes": [n for n, _ in recorder.randperm], "steps": []}
    saved = {f"randperm.{i}": p for i, (_, p) in enumerate(recorder.randperm)}
    saved.update({f"mask.{i}": m.contiguous() for i, m in enumerate(recorder.masks)})
    record["masks"] = len(recorder.masks)
    for s, groups in enumerate(recorder.steps):
        record["steps"].append([[list(g.shape) if g is not None else None for g in group] for group in groups])
        for gi, group in enumerate(groups):
            for pi, g in enumerate(group):
                if g is not None:
                    saved[f"grad.{s}.{gi}.{pi}"] = g.contiguous()
    save_file(saved, str(out / "authors.safetensors"))
    (out / "authors.json").write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
