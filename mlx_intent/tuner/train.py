"""Fine-tune a registry model with a LoRA adapter (mlx-lm's tuner) so that, after the
classifier's own prompt, it writes the right JSON.

Each training row is exactly what the classifier feeds at run time: the prompt
(compact style), the cleaned query tokens, and the answer's tokens as the
constrained sampler writes them, up to the primary intent; the loss covers the
name only (everything else in the answer is forced by the sampler).  A multi-intent
row is seen once per intent (the primary twice), so the scored distribution puts
real probability on the secondary intents and the all_intents threshold can find
them.  The adapter lands in ``<home>/adapters/<model>/`` and classify loads it.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from mlx_intent.errors import InputError
from mlx_intent.evaluation.data import read_labelled
from mlx_intent.feedback.data import fold_feedback
from mlx_intent.models import loading, registry
from mlx_intent.prompts import PROMPT_STYLES, chat_prompt, clean_user_text, special_strings
from mlx_intent.sampler import AnswerVocab
from mlx_intent.staging import staging_dir
from mlx_intent.tuner import check_finite, install

LORA_KEYS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


def answers_for(row: dict) -> list[tuple[str, float, list[str]]]:
    """The target answers of a row: the primary twice, each secondary once."""
    intents = list(row["all_intents"])
    if len(intents) == 1:
        return [(intents[0], 1.0, intents)]
    share = 1.0 / (len(intents) + 1)
    out = [(intents[0], 2 * share, intents)] * 2
    for other in intents[1:]:
        out.append((other, share, [other] + [i for i in intents if i != other]))
    return out


def answer_loss(width: int):
    """mlx-lm's default loss, but the output layer (49k-way for SmolLM2, as costly as
    several transformer blocks per position) only runs on the ``width`` positions
    after each row's prompt, where the answer is."""
    import mlx.core as mx
    import mlx.nn as nn

    def loss(model, batch, lengths):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        hidden = model.model(inputs)
        pos = mx.minimum(lengths[:, 0:1] - 1 + mx.arange(width)[None], targets.shape[1] - 1)
        hidden = mx.take_along_axis(hidden, pos[..., None], axis=1)
        head = model.lm_head if "lm_head" in model else model.model.embed_tokens.as_linear
        mask = (pos + 1) < lengths[:, 1:]  # targets up to the row's last token, never padding
        ce = nn.losses.cross_entropy(head(hidden), mx.take_along_axis(targets, pos, axis=1)) * mask
        ntoks = mask.sum()
        return ce.astype(mx.float32).sum() / ntoks, ntoks

    return loss


def build_examples(rows: list[dict], tokenizer, chat_format: str, style: str) -> list[tuple[list[int], int]]:
    """(tokens, where the loss starts) pairs, as mlx-lm's trainer takes them.

    A row is the prompt and the answer up to the end of the primary's name; the loss
    covers only the tokens after the stretch every answer shares (``{"primary_intent": "``),
    i.e. the choice of name.  The rest of the answer is forced by the sampler, and
    averaging the loss over it would dilute the one signal that matters ~10x."""

    def encode(text: str) -> list[int]:
        return list(tokenizer.encode(text, add_special_tokens=False))

    prompt = chat_prompt(tokenizer, chat_format, PROMPT_STYLES[style]())  # the classifier's prompt, token for token
    vocab = AnswerVocab(encode)
    shared = len(vocab.stem()[0])
    names = {name: vocab.name_tokens(name) for name in vocab.names}  # the classifier's trie paths
    specials = special_strings(tokenizer)
    examples = []
    for row in rows:
        ids = prompt.prefix + prompt.user(clean_user_text(row["text"], specials)) + prompt.suffix + vocab.prefix
        for primary, _, _ in answers_for(row):
            examples.append((ids + names[primary], len(ids) + shared))
    return examples


def lr_schedule(learning_rate: float, iters: int):
    """Linear warm-up over the first 10% of the steps (at most 50), then cosine decay to a tenth.

    Without the warm-up, LoRA on every layer of SmolLM2 at 5e-4 diverged within 20 steps
    (loss 3.5 -> 4.6)."""
    import mlx.optimizers as optim

    warmup = min(50, iters // 10)
    decay = optim.cosine_decay(learning_rate, max(1, iters - warmup), learning_rate * 0.1)
    if not warmup:
        return decay
    ramp = optim.linear_schedule(learning_rate / warmup, learning_rate, warmup)
    return optim.join_schedules([ramp, decay], [warmup])


def train_adapter(
    name: str,
    train_path: Path,
    valid_path: Path | None = None,
    iters: int | None = None,
    epochs: float = 1.0,
    batch_size: int = 16,
    learning_rate: float = 3e-4,
    num_layers: int = 8,
    rank: int = 16,
    style: str = "compact",
    seed: int = 0,
    out_dir: Path | None = None,
    report: Callable[[str], None] = print,
    *,
    home: Path,
    feedback: list[dict] | None = None,
) -> dict:
    """Train, then write adapters.safetensors and adapter_config.json atomically; return a summary.
    ``feedback`` rows (``mlx_intent.feedback.data.training_rows``) are folded into the training rows, outweighing them.
    An adapter already in ``out_dir`` is kept aside as ``<name>.previous/`` (``mlx-intent train`` asks for --force).
    ``home`` is the models folder the model loads from and the adapter goes to (``Settings.home``)."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.tuner.trainer import TrainingArgs, TrainingCallback, evaluate, train
    from mlx_lm.tuner.utils import linear_to_lora_layers

    if batch_size < 1:  # before the model loads; 0 would only fail (ZeroDivisionError) after it
        raise InputError(f"batch size must be at least 1, got {batch_size}")
    spec = registry.get_spec(name)
    mx.random.seed(seed)
    model, tokenizer = loading.load(name, home=home)  # float32 on the CPU, 4-bit on Metal (QLoRA)
    model.freeze()
    lora = {"rank": rank, "scale": 20.0, "dropout": 0.0, "keys": list(LORA_KEYS)}
    num_layers = min(num_layers, len(model.model.layers))
    linear_to_lora_layers(model, num_layers, lora)
    rows = fold_feedback(read_labelled(train_path), feedback) if feedback else read_labelled(train_path)
    train_set = build_examples(rows, tokenizer, spec.chat_format, style)
    valid_set = build_examples(read_labelled(valid_path), tokenizer, spec.chat_format, style) if valid_path else None
    batch_size = min(batch_size, len(train_set))
    iters = iters or max(1, int(epochs * len(train_set) / batch_size))
    out_dir = out_dir or registry.adapter_dir(name, home)
    tmp = staging_dir(out_dir)
    losses: dict[str, list] = {"train": [], "valid": []}

    class Progress(TrainingCallback):
        def on_train_loss_report(self, info: dict) -> None:
            losses["train"].append((info["iteration"], round(info["train_loss"], 4)))
            report(f"iter {info['iteration']}/{iters}: train loss {info['train_loss']:.3f}")

    args = TrainingArgs(
        batch_size=batch_size,
        iters=iters,
        steps_per_report=max(1, iters // 20),
        steps_per_save=iters + 1,
        max_seq_length=1024,
        adapter_file=str(tmp / "adapters.safetensors"),
    )
    start = time.perf_counter()
    try:
        train(
            model,
            optim.Adam(learning_rate=lr_schedule(learning_rate, iters)),
            train_set,
            None,  # mlx-lm would also validate at step 1; the loss is reported once, at the end
            args=args,
            loss=answer_loss(max(len(t) - n for t, n in train_set + (valid_set or []))),
            training_callback=Progress(),
        )
        seconds = time.perf_counter() - start
        if valid_set:
            loss = answer_loss(max(len(t) - n for t, n in valid_set))
            value = evaluate(model, valid_set, batch_size, -1, args.max_seq_length, loss)
            losses["valid"].append((iters, round(float(value), 4)))
            report(f"valid loss {losses['valid'][-1][1]:.3f}")
        summary = {
            "model": name,
            "fine_tune_type": "lora",
            "num_layers": num_layers,
            "lora_parameters": lora,
            "prompt_style": style,
            "train": str(train_path),
            "feedback": len(feedback or ()),
            "valid": str(valid_path) if valid_path else None,
            "examples": len(train_set),
            "iters": iters,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "seed": seed,
            "train_seconds": round(seconds, 1),
            "losses": losses,
        }
        (tmp / "adapter_config.json").write_text(json.dumps(summary, indent=2))
        tmp.chmod(0o755)  # mkdtemp makes it private
        check_finite(tmp / "adapters.safetensors")  # issue 26: a diverged run never replaces the adapter
        install(tmp, out_dir)  # an earlier adapter goes to <name>.previous/
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary
