"""gatelab analyze --hf: a transformers checkpoint's heads. A causal LM (patched with ``softmax``, the same
weights) gets the full head report on a text's next-token targets; an encoder (BERT, e.g. all-MiniLM-L6-v2)
gets its [CLS] / [SEP] sink heads and the effect of ablating them on the sentence embedding."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from gatelab.analysis import ModelLayers, Site, ablate, capture
from gatelab.lab.analyze import analyze_lm, tensors_to_lists, write_report
from gatelab.lab.rundir import atomic_write_json, atomic_write_text, locked, refuse_existing
from gatelab.lab.tables import markdown_table, to_json_safe

SENTENCES = (
    "The cat sat on the mat by the door.",
    "A quick brown fox jumps over the lazy dog.",
    "Rain is expected in the north of the country tomorrow.",
    "She opened the letter and read it twice before answering.",
    "The committee will publish its report next month.",
    "Fresh bread smells better than almost anything else.",
    "He forgot his umbrella on the train again.",
    "Solar panels convert sunlight directly into electricity.",
    "The museum is closed on Mondays and public holidays.",
    "Children learn languages faster than most adults do.",
    "The recipe needs two eggs, flour and a little milk.",
    "Our flight was delayed by three hours because of fog.",
)


def _mean_pooled(out) -> torch.Tensor:
    """all-MiniLM-L6-v2's sentence embedding: mean over tokens, L2-normalised (its 1_Pooling + Normalize)."""
    return torch.nn.functional.normalize(out.last_hidden_state.mean(1), dim=-1)


@torch.no_grad()
def encoder_sinks(model, tokenizer, sentences=SENTENCES, k: int = 6, seed: int = 0) -> dict:
    """Per head of an encoder (patched with gatelab.hf.encoder): the attention mass on [CLS] (first token)
    and [SEP] (last token), averaged over queries and sentences; then the effect of zero-ablating the k
    heads with the most [CLS] + [SEP] mass together on the sentence embedding (1 - cosine to the
    unablated one; the checkpoint has no MLM head, so no masked-LM loss), against k heads with the least
    mass and k random others (5 draws)."""
    layers = ModelLayers(model)
    L, H = len(layers), max(layers.n_heads)
    cls, sep = torch.zeros(L, H), torch.zeros(L, H)
    encoded = [tokenizer([s], return_tensors="pt") for s in sentences]
    for enc in encoded:
        _, cache = capture(layers, lambda enc=enc: model(**enc), [Site("attn", i) for i in range(L)])
        for i in range(L):
            attn = cache[Site("attn", i)][0].float()  # (H, T, T)
            cls[i] += attn[:, :, 0].mean(-1) / len(encoded)
            sep[i] += attn[:, :, -1].mean(-1) / len(encoded)
    mass = (cls + sep).flatten()
    order = mass.argsort(descending=True)
    top, bottom = order[:k].tolist(), order[-k:].tolist()
    rest = order[k:]
    generator = torch.Generator().manual_seed(seed)
    draws = [rest[torch.randperm(len(rest), generator=generator)[:k]].tolist() for _ in range(5)]

    def change(heads: list[int]) -> float:
        by_layer: dict[int, list[int]] = {}
        for j in heads:
            by_layer.setdefault(j // H, []).append(j % H)
        total = 0.0
        for enc in encoded:
            clean = _mean_pooled(model(**enc))
            ablated = _mean_pooled(ablate(layers, lambda enc=enc: model(**enc), by_layer))
            total += float(1 - (clean * ablated).sum()) / len(encoded)
        return total

    return {
        "cls": cls,
        "sep": sep,
        "top": [divmod(j, H) for j in top],
        "bottom": [divmod(j, H) for j in bottom],
        "change_top": change(top),
        "change_bottom": change(bottom),
        "change_random": sum(change(d) for d in draws) / len(draws),
    }


def encoder_markdown(name: str, result: dict, seconds: float) -> str:
    header = ["layer"] + [f"h{h}" for h in range(result["cls"].shape[1])]

    def table(values):
        return markdown_table(
            header, [[str(i)] + [f"{float(v):.2f}" for v in row] for i, row in enumerate(values)]
        )

    return "\n".join(
        [
            f"# Sink heads: {name}",
            "",
            f"Analysis took {seconds:.1f} s over {result['sentences']} sentences.",
            "",
            "## attention mass on [CLS] (first token)",
            "",
            table(result["cls"]),
            "",
            "## attention mass on [SEP] (last token)",
            "",
            table(result["sep"]),
            "",
            "## zero-ablating k heads together: sentence-embedding change (1 - cosine)",
            "",
            f"- the {len(result['top'])} heads with the most [CLS] + [SEP] mass {result['top']}: "
            f"{result['change_top']:.4f}",
            f"- the {len(result['bottom'])} with the least {result['bottom']}: {result['change_bottom']:.4f}",
            f"- {len(result['top'])} random others (mean of 5 draws): {result['change_random']:.4f}",
            "",
            "The checkpoint has no masked-LM head, so the effect is read on the sentence embedding "
            "(mean pooling, L2-normalised, as the model is used), not on a masked-LM loss.",
            "",
        ]
    )


def text_rows(tokenizer, text: str, seq_len: int, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) (rows, seq_len): consecutive windows of the tokenised text, next-token targets."""
    ids = torch.tensor(tokenizer(text)["input_ids"])
    need = rows * seq_len + 1
    if len(ids) < need + seq_len:
        raise ValueError(
            f"the text has {len(ids)} tokens; {rows} rows of {seq_len} (and one more row for the "
            f"corrupted run) need {need + seq_len}"
        )
    windows = ids[: need + seq_len]
    inputs = windows[: rows * seq_len].view(rows, seq_len)
    targets = windows[1 : rows * seq_len + 1].view(rows, seq_len)
    return inputs, targets


def analyze_hf(
    path: str | Path,
    out: str | Path,
    *,
    text: str | Path | None = None,
    seq_len: int = 64,
    rows: int = 8,
    overwrite: bool = False,
    say=print,
) -> Path:
    """Analyse a transformers checkpoint folder; the report goes to ``out``."""
    from gatelab.hf.encoder import load_for_analysis

    model, tokenizer, kind = load_for_analysis(path)
    name = str(path)
    start = time.perf_counter()
    if kind == "causal":
        if text is None:
            raise ValueError("--hf with a causal LM needs --text FILE: the text whose next tokens are scored")
        inputs, targets = text_rows(tokenizer, Path(text).read_text(), seq_len, rows)
        corrupt = inputs.roll(1, dims=0)  # other windows of the same text
        result = analyze_lm(model, inputs, targets, corrupt)
        return write_report(name, result, Path(out), time.perf_counter() - start, overwrite)
    result = encoder_sinks(model, tokenizer)
    result["sentences"] = len(SENTENCES)
    seconds = time.perf_counter() - start
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with locked(out):
        refuse_existing(out, ("report.md", "results.json"), overwrite=overwrite)
        atomic_write_json(out / "results.json", to_json_safe(tensors_to_lists(result)))
        atomic_write_text(out / "report.md", encoder_markdown(name, result, seconds))
    say(f"{name}: {out / 'report.md'} ({seconds:.1f} s)")
    return out / "report.md"


__all__ = ["SENTENCES", "encoder_sinks", "analyze_hf", "text_rows"]
