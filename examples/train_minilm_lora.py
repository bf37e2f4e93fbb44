"""Train the bundled example adapter: LoRA on all-MiniLM-L6-v2 for sentence-topic embeddings.

The task (``examples/data/topics.tsv``, 160 hand-written sentences in 4 topics) asks the embedding
model to pull same-topic sentences together: a supervised contrastive (SupCon) loss on mean-pooled,
L2-normalised embeddings, so the adapter needs no task head and works on the plain ``BertModel``
that ``examples.minilm:model`` returns. LoRA r=8, alpha=16, no dropout, on ``query``/``value``;
60 AdamW steps of 16 sentences at lr 1e-3 by default.

Rerun from the repository root (under a minute on 2 CPU cores; deterministic, so it reproduces
``adapter_model.safetensors`` byte for byte)::

    python examples/train_minilm_lora.py [--out examples/minilm-lora] [--steps 60]

It prints, for a fixed held-out quarter of the data (the last 10 sentences of each topic), the
nearest-centroid topic accuracy (centroids from the training split) and the cosine gap (mean
same-topic minus mean different-topic similarity) of the base and of the adapted model, and how much
the adapter changes the model's ``last_hidden_state``. The adapter directory gets PEFT's
``adapter_config.json`` (with ``base_model_name_or_path`` set to the public model name) and
``adapter_model.safetensors``; PEFT's generated README.md model card is removed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

os.environ.setdefault("HF_HUB_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from examples.minilm import model_path  # noqa: E402

SEED = 0
MAX_LENGTH = 32
TEMPERATURE = 0.1
BASE_MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"

Example = tuple[str, str]  # (label, sentence)


def read_dataset(path: Path) -> list[Example]:
    """``label<TAB>sentence`` rows after a one-line header."""
    rows = [line.split("\t") for line in path.read_text().splitlines()[1:] if line.strip()]
    return [(label, sentence) for label, sentence in rows]


def split(rows: list[Example], held_out: float = 0.25) -> tuple[list[Example], list[Example]]:
    """A fixed stratified split: the last quarter of each topic (in file order) is held out."""
    train: list[Example] = []
    test: list[Example] = []
    for label in sorted({label for label, _ in rows}):
        topic = [row for row in rows if row[0] == label]
        cut = int(len(topic) * (1 - held_out))
        train += topic[:cut]
        test += topic[cut:]
    return train, test


def embed(model: torch.nn.Module, tokenizer, sentences: list[str]) -> torch.Tensor:
    """Mean-pooled (attention-mask aware), L2-normalised sentence embeddings."""
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def supervised_contrastive(embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """SupCon: each sentence should be closer to its same-topic batch mates than to the rest."""
    logits = embeddings @ embeddings.T / TEMPERATURE
    self_mask = torch.eye(len(labels), dtype=torch.bool)
    logits = logits.masked_fill(self_mask, float("-inf"))
    positives = (labels[:, None] == labels[None, :]) & ~self_mask
    log_prob = logits.log_softmax(dim=-1).masked_fill(~positives, 0.0)
    return -(log_prob.sum(1) / positives.sum(1).clamp(min=1)).mean()


@torch.no_grad()
def evaluate(model: torch.nn.Module, tokenizer, train: list[Example], test: list[Example]) -> dict[str, float]:
    """Held-out nearest-centroid accuracy and cosine gap (same-topic minus different-topic)."""
    labels = sorted({label for label, _ in train})
    train_emb = embed(model, tokenizer, [sentence for _, sentence in train])
    train_labels = torch.tensor([labels.index(label) for label, _ in train])
    centroids = F.normalize(torch.stack([train_emb[train_labels == k].mean(0) for k in range(len(labels))]), dim=-1)
    test_emb = embed(model, tokenizer, [sentence for _, sentence in test])
    truth = torch.tensor([labels.index(label) for label, _ in test])
    predicted = (test_emb @ centroids.T).argmax(1)
    sims = test_emb @ test_emb.T
    same = truth[:, None] == truth[None, :]
    off_diagonal = ~torch.eye(len(test), dtype=torch.bool)
    return {
        "accuracy": (predicted == truth).float().mean().item(),
        "cosine_gap": (sims[same & off_diagonal].mean() - sims[~same].mean()).item(),
    }


@torch.no_grad()
def output_change(adapted: torch.nn.Module, base: torch.nn.Module, tokenizer, sentences: list[str]) -> float:
    """max|y_adapted - y_base| / max|y_adapted| over ``last_hidden_state``."""
    batch = tokenizer(sentences, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")
    y_adapted = adapted(**batch).last_hidden_state
    y_base = base(**batch).last_hidden_state
    return ((y_adapted - y_base).abs().max() / y_adapted.abs().max()).item()


def save_adapter(model: torch.nn.Module, out: Path) -> None:
    """PEFT's save, with the trainer's local base-model path replaced and the model card dropped."""
    model.save_pretrained(str(out))
    config_file = out / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_name_or_path"] = BASE_MODEL_NAME
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")  # PEFT's layout, plus a final newline
    (out / "README.md").unlink(missing_ok=True)


def display(path: Path) -> str:
    """``path`` relative to the working directory where possible (for log lines)."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "minilm-lora", help="adapter directory to write")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps (default 60)")
    parser.add_argument("--batch", type=int, default=16, help="sentences per step (default 16)")
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    args = parser.parse_args()

    import transformers
    from peft import LoraConfig, get_peft_model

    transformers.logging.disable_progress_bar()
    random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    try:
        torch.use_deterministic_algorithms(True)
    except RuntimeError as error:  # pragma: no cover - CPU kernels are deterministic anyway
        print(f"note: deterministic algorithms unavailable ({error})")
    start = time.perf_counter()

    train, test = split(read_dataset(HERE / "data" / "topics.tsv"))
    labels = sorted({label for label, _ in train})
    print(f"{len(train)} training and {len(test)} held-out sentences in {len(labels)} topics: {', '.join(labels)}")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_path())
    base = transformers.AutoModel.from_pretrained(model_path()).eval()
    before = evaluate(base, tokenizer, train, test)
    print(f"base     held-out accuracy {before['accuracy']:.3f}  cosine gap {before['cosine_gap']:.3f}")

    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"])
    model = get_peft_model(transformers.AutoModel.from_pretrained(model_path()), config)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    rng = random.Random(SEED)
    model.train()
    for step in range(1, args.steps + 1):
        batch = rng.sample(train, args.batch)
        target = torch.tensor([labels.index(label) for label, _ in batch])
        loss = supervised_contrastive(embed(model, tokenizer, [sentence for _, sentence in batch]), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step == 1 or step % 10 == 0 or step == args.steps:
            print(f"step {step:3d}/{args.steps}  loss {loss.item():.4f}")
    model.eval()

    after = evaluate(model, tokenizer, train, test)
    print(f"adapted  held-out accuracy {after['accuracy']:.3f}  cosine gap {after['cosine_gap']:.3f}")
    change = output_change(model, base, tokenizer, [sentence for _, sentence in test[::5]])
    print(f"adapter effect on last_hidden_state: max|adapted - base| / max|adapted| = {change:.3f}")

    save_adapter(model, args.out)
    size = (args.out / "adapter_model.safetensors").stat().st_size
    print(f"saved {display(args.out)} ({size:,} bytes) in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
