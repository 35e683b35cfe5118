"""KV-cache policies inside ``gatelab compare --kv-cache``: the options, the token-by-token decoding of each
trained run under every policy and budget, and the report's tables ("In-context KV-Cache Eviction for LLMs
via Attention-Gate", Zeng et al., 2024, and its baselines)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from gatelab.lab.tables import finite, format_cell, markdown_table, mean_std, rich_table

DEFAULT_BUDGETS = (0.5, 0.25)
DEFAULT_GATE_STEPS = 100
DEFAULT_CONTEXT = (
    1  # decode at the training length; --kv-context 2 decodes twice as long (gatelab cache's way)
)
# (row key, header, format) of the KV-cache tables; "loss_vs_full" is the paired difference per seed
KV_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("loss", "loss", ".3f"),
    ("loss_vs_full", "loss - full", "+.3f"),
    ("accuracy", "accuracy", ".3f"),
    ("kept_fraction", "kept", ".3f"),
    ("kept_bytes_fraction", "kept+gate", ".3f"),
    ("held_fraction", "held", ".3f"),
    ("peak_cache_kib", "peak cache KiB", ".1f"),
    ("tokens_per_s", "decode tok/s", ".0f"),
)
KV_NOTES = (
    "Each trained model decodes validation sequences of its task token by token (teacher forcing), so "
    "every prediction sees only what the policy kept: the first diagnostic batch, or with --kv-context N "
    "as many validation rows N times the training length (eviction matters most on contexts longer than "
    "trained on). budget: fraction of the evaluated sequence length "
    "(streaming and h2o keep at most that many tokens; attention_gate is fine-tuned for the given steps "
    "towards that keep rate, on a copy of the model whose own weights fine-tune too, and then keeps what "
    "its gates choose); full: the plain cache, the reference. "
    "loss - full: paired difference to the full cache of the same run (for attention_gate: of the "
    "control, the run's model fine-tuned the same steps, batches and learning rate without gates, since "
    "the extra training alone can lower the loss); kept: tokens held / tokens seen at "
    "the end, mean over layers; kept+gate: bytes of the kept keys and values plus an attention gate's own "
    "state / bytes of the full cache (what a cache without padding holds); held: bytes allocated (an "
    "attention gate's own state included; the cache is rectangular, padded to its longest row) / bytes of "
    "the full cache; peak cache KiB: most bytes held over all layers at any step. Mixers with a fixed-size "
    "recurrent state (or their own cache) take no policy: 'no KV cache'."
)


@dataclass(frozen=True)
class KVCacheOptions:
    policies: tuple[str, ...]  # "full" first, then the requested policies in the order given
    budgets: tuple[float, ...]  # fractions in (0, 1] of the evaluated sequence length
    gate_steps: int  # fine-tuning steps of the attention gates, per budget
    context: int = DEFAULT_CONTEXT  # decoded sequences are this many times the training length

    def to_dict(self) -> dict:
        return {"policies": list(self.policies), "budgets": list(self.budgets), "gate_steps": self.gate_steps,
                "context": self.context}  # fmt: skip


def parse_options(
    policies: str | None, budgets: str | None, gate_steps: int | None, context: int | None = None
) -> KVCacheOptions | None:
    """The options of ``--kv-cache``, ``--kv-budgets``, ``--kv-gate-steps`` and ``--kv-context`` (None: not
    asked for).

    A ValueError names the option for an unknown policy, a budget outside (0, 1], gate steps or context
    < 1, or an option that would be ignored (budgets without a policy that takes one, gate steps without
    attention_gate)."""
    from gatelab.cache import POLICIES

    if policies is None:
        for name, value in (
            ("--kv-budgets", budgets),
            ("--kv-gate-steps", gate_steps),
            ("--kv-context", context),
        ):
            if value is not None:
                raise ValueError(f"{name} applies only with --kv-cache; add e.g. --kv-cache streaming,h2o")
        return None
    names = [p.strip() for p in policies.split(",") if p.strip()]
    if not names:
        raise ValueError(f"--kv-cache expects a comma-separated list of policies, got {policies!r}")
    for name in names:
        if name not in POLICIES:
            raise ValueError(f"--kv-cache: unknown policy {name!r}; known policies: {', '.join(POLICIES)}")
    if len(set(names)) != len(names):
        raise ValueError(f"--kv-cache lists a policy twice: {names}")
    names = ["full"] + [n for n in names if n != "full"]
    if budgets is None:
        fractions = DEFAULT_BUDGETS
    else:
        try:
            fractions = tuple(float(b) for b in budgets.split(",") if b.strip())
        except ValueError:
            raise ValueError(
                f"--kv-budgets expects comma-separated fractions in (0, 1], got {budgets!r}"
            ) from None
        bad = [b for b in fractions if not 0 < b <= 1]  # NaN is bad too
        if not fractions or bad:
            raise ValueError(f"--kv-budgets must be fractions in (0, 1], got {budgets!r}")
        if len(set(fractions)) != len(fractions):
            raise ValueError(f"--kv-budgets lists a budget twice: {budgets!r}")
        if names == ["full"]:
            raise ValueError(
                "--kv-budgets applies to streaming, h2o and attention_gate; --kv-cache lists none"
            )
    if gate_steps is not None:
        if isinstance(gate_steps, bool) or not isinstance(gate_steps, int) or gate_steps < 1:
            raise ValueError(f"--kv-gate-steps must be a positive int, got {gate_steps!r}")
        if "attention_gate" not in names:
            raise ValueError("--kv-gate-steps applies to the attention_gate policy; add it to --kv-cache")
    if context is not None and (isinstance(context, bool) or not isinstance(context, int) or context < 1):
        raise ValueError(f"--kv-context must be a positive int (times the training length), got {context!r}")
    return KVCacheOptions(
        tuple(names),
        tuple(fractions),
        DEFAULT_GATE_STEPS if gate_steps is None else gate_steps,
        DEFAULT_CONTEXT if context is None else context,
    )


def longer_task(task, context: int):
    """``task`` rebuilt at ``context`` times its length; a ValueError naming --kv-context when it cannot be
    (e.g. MQAR needs a vocabulary larger than its length)."""
    from gatelab.lab.tasks import make_task

    try:
        return make_task(task.name, **{**task.options, "seq_len": task.seq_len * context})
    except ValueError as error:
        raise ValueError(
            f"--kv-context {context}: {task.name} cannot run at {context}x its length: {error}"
        ) from None


def no_cache_reason(model) -> str | None:
    """Why some block of ``model`` takes no cache policy, or None when every block takes one."""
    from gatelab.cache import check_cacheable

    for block in model.blocks:
        try:
            check_cacheable(block.mixer)
        except (TypeError, ValueError) as error:
            return str(error)
    return None


def evaluate_run(model, task, batches: list, options: KVCacheOptions, *, batch_size: int, seed: int) -> dict:
    """The ``kv_cache*`` fields of one run's results entry: decode the first of ``batches`` (inputs (B, T),
    targets (B, T)), or with ``options.context`` > 1 as many validation rows of ``task`` at context x T,
    under "full" and every (budget, policy); "kv_cache_note" instead for a model that takes no policy. A
    failing policy gives a row with "error" and leaves the others."""
    from gatelab.lab.kv.evaluate import decode_eval, finetune_gates, finetune_lm

    reason = no_cache_reason(model)
    if reason is not None:
        return {"kv_cache": [], "kv_cache_note": f"no KV cache: {reason}"}
    start = time.perf_counter()
    device = next(model.parameters()).device
    inputs, targets = batches[0]
    if options.context > 1:  # the same task at a longer length: its validation stream, as many rows
        inputs, targets = longer_task(task, options.context).eval_batches(1, inputs.shape[0], seed=seed)[0]
    batch = [(inputs.to(device), targets.to(device))]
    B, T = inputs.shape
    rows = []

    def record(policy: str, budget: float, evaluate) -> None:
        row = {"policy": policy, "budget": budget}
        try:
            metrics, extra = evaluate()
        except (KeyboardInterrupt, MemoryError):
            raise
        except Exception as error:  # one failing policy must not hide the others' rows
            rows.append({**row, "error": f"{type(error).__name__}: {error}"})
            return
        keys = ("loss", "accuracy", "kept_fraction", "kept_bytes_fraction", "held_fraction", "peak_cache_bytes",
                "tokens_per_s")  # fmt: skip
        rows.append({**row, **{k: metrics[k] for k in keys}, **extra})

    control = {}

    def reference() -> dict:
        """Full cache of the control: the run's model fine-tuned as the gated copies are, without gates
        (the same steps, batches and learning rate), so a gate row's gain is not the extra training's."""
        if not control:
            tuned, _ = finetune_lm(model, task, steps=options.gate_steps, batch_size=batch_size, seed=seed)
            control.update(decode_eval(tuned, batch, "full"))
        return control

    def gated(budget: float):
        tuned, history = finetune_gates(
            model, task, target_keep=budget, steps=options.gate_steps,
            batch_size=batch_size, seed=seed,
        )  # fmt: skip
        metrics = decode_eval(tuned, batch, "attention_gate")
        ref = reference()
        extra = {"gate_steps": options.gate_steps, "train_kept": history[-1]["kept"] if history else None,
                 "reference_loss": ref["loss"], "reference_accuracy": ref["accuracy"]}  # fmt: skip
        return metrics, extra

    record("full", 1.0, lambda: (decode_eval(model, batch, "full"), {}))
    for budget in options.budgets:
        for policy in options.policies[1:]:
            if policy == "attention_gate":
                record(policy, budget, lambda b=budget: gated(b))
            else:
                record(policy, budget,
                       lambda p=policy, b=budget: (decode_eval(model, batch, p, budget=b, seq_len=T), {}))  # fmt: skip
    return {"kv_cache": rows, "kv_cache_batch": {"batch_size": B, "seq_len": T},
            "kv_cache_wall_s": time.perf_counter() - start}  # fmt: skip


def has_rows(results: dict) -> bool:
    return any(run.get("kv_cache") for run in results.get("runs", []))


def failures(runs: list[dict]) -> list[str]:
    """'mixer on task (seed s): policy budget: error' for every KV-cache row that failed."""
    return [
        f"{r['mixer']} on {r['task']} (seed {r['seed']}): {row['policy']} {row['budget']}: {row['error']}"
        for r in runs
        for row in r.get("kv_cache") or []
        if "error" in row
    ]


def table_rows(results: dict, task: str) -> tuple[list[str], list[list[str]]]:
    """Header and rows of one task's KV-cache table: mixer x policy x budget, mean (± std) over seeds."""
    header = ["mixer", "policy", "budget"] + [h for _, h, _ in KV_COLUMNS]
    blank = [""] * len(KV_COLUMNS)
    rows = []
    for mixer in results["config"]["mixers"]:
        runs = [
            r for r in results["runs"] if r["task"] == task and r["mixer"] == mixer and r["status"] == "ok"
        ]
        notes = [r["kv_cache_note"] for r in runs if r.get("kv_cache_note")]
        if notes:
            rows.append([mixer, "no KV cache", ""] + blank)
            continue
        groups: dict[tuple[str, float], list[dict]] = {}
        for run in runs:
            full = next((row for row in run.get("kv_cache") or [] if row["policy"] == "full"), {})
            for row in run.get("kv_cache") or []:
                groups.setdefault((row["policy"], row["budget"]), []).append(_metrics(row, full))
        for (policy, budget), metrics in groups.items():
            errors = [m["error"] for m in metrics if m.get("error")]
            if errors:
                rows.append([mixer, policy, f"{budget:g}", f"failed: {errors[0][:60]}"] + blank[1:])
                continue
            cells = [format_cell(mean_std([m[k] for m in metrics]), f) for k, _, f in KV_COLUMNS]
            rows.append([mixer, policy, f"{budget:g}"] + cells)
    return header, rows


def _metrics(row: dict, full: dict) -> dict:
    if "error" in row:
        return {"error": row["error"]}
    out = {k: finite(row.get(k)) for k, _, _ in KV_COLUMNS}
    loss, reference = finite(row.get("loss")), finite(row.get("reference_loss", full.get("loss")))
    out["loss_vs_full"] = loss - reference if loss is not None and reference is not None else None
    peak = finite(row.get("peak_cache_bytes"))
    out["peak_cache_kib"] = peak / 1024 if peak is not None else None
    return out


def heading(results: dict, task: str) -> str:
    """The task, its decoded batch and the gates' fine-tuning steps, read from the runs themselves (a
    merged report may join runs asked for different options)."""
    runs = [r for r in results["runs"] if r["task"] == task]
    batches = {(b["batch_size"], b["seq_len"]) for r in runs if (b := r.get("kv_cache_batch"))}
    steps = sorted(
        {row["gate_steps"] for r in runs for row in r.get("kv_cache") or [] if "gate_steps" in row}
    )
    text = task
    if batches:
        text += ": " + " / ".join(f"{B} sequences of T={T}" for B, T in sorted(batches))
        text += " decoded token by token"
    if steps:
        text += f"; attention gates fine-tuned {'/'.join(map(str, steps))} steps per budget"
    return text


def markdown_section(results: dict) -> list[str]:
    """The report's "KV-cache policies" section as lines, or [] when no run has KV-cache rows."""
    if not has_rows(results):
        return []
    lines = ["## KV-cache policies", "", KV_NOTES, ""]
    for task in results["config"]["tasks"]:
        header, rows = table_rows(results, task)
        if any(row[1] != "no KV cache" for row in rows):
            lines += [f"### {heading(results, task)}", "", markdown_table(header, rows), ""]
        elif rows:
            lines += [f"### {task}", "", "No mixer run on this task keeps a KV cache.", ""]
    return lines


def print_tables(results: dict, console) -> None:
    """One rich table per task with KV-cache rows."""
    if not has_rows(results):
        return
    for task in results["config"]["tasks"]:
        header, rows = table_rows(results, task)
        if any(row[1] != "no KV cache" for row in rows):
            console.print(rich_table(f"KV-cache policies, {heading(results, task)}", header, rows, left=2))
