"""Label your own texts with a fine-tuned model: its class (negative or positive for IMDB), with
its probability.

    python predict.py --checkpoint runs/NAME "This film was a delight." "Two hours I want back."
    python predict.py --checkpoint runs/NAME --file reviews.txt --json   # one review per line
    cat reviews.txt | python predict.py --checkpoint merged/NAME          # from standard input

The checkpoint may be a run folder, an adapter folder, a merged model folder
(``python lora_model.py merge``) or a head or full checkpoint. Reviews are tokenized, batched
and scored with the same code as evaluate.py, cut as the checkpoint was trained (its recorded
``--max-length`` and ``--truncation``); the output says which reviews were cut.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from datasets import Dataset

from data import (
    PaddingCollator,
    Preprocessing,
    describe_truncation,
    make_loader,
    resolve_preprocessing,
    tokenize,
)
from evaluate import ScoringPreprocessing, predict_in_order
from lora_model import label_names_of, load_checkpoint
from machinery.checkpoints import ADAPTER_CONFIG, find_checkpoint
from machinery.cli import UsageError, add_options, run_command
from machinery.data_sources import FEATURES, LABEL, TEXT
from machinery.options import RuntimeOptions, fill_device_defaults
from machinery.runtime import pick_device, pick_precision, use_device
from machinery.stats import (
    UNCALIBRATED,
    add_calibration_argument,
    scale_logits,
    softmax,
    temperature_to_apply,
)

STDIN = "-"
# The table shows the start of each review; --json gives the whole text.
PREVIEW_CHARS = 72
TRUNCATED_MARK = "*"


@dataclass
class Prediction:
    """One review's label, the probability of that label, and whether it was cut short."""

    text: str
    label: str
    probability: float
    probabilities: dict[str, float]
    tokens: int  # the review's length in tokens, [CLS] and [SEP] included, before truncation
    truncated: bool


def build_parser() -> argparse.ArgumentParser:
    """The predict.py command line."""
    parser = argparse.ArgumentParser(
        description="Label reviews (or any texts) with the classes of a fine-tuned checkpoint "
                    "(negative or positive for IMDB) and "
                    "print each label with its probability.")
    parser.add_argument("texts", nargs="*", metavar="TEXT",
                        help="reviews to label; without TEXT or --file, one review per line is "
                             "read from standard input")
    parser.add_argument("--checkpoint", required=True, metavar="PATH",
                        help="a run folder (runs/NAME), an adapter folder, a merged model "
                             "folder from 'python lora_model.py merge', or a head or full "
                             "checkpoint folder")
    parser.add_argument("--file", type=Path, metavar="PATH",
                        help="a UTF-8 text file with one review per line (blank lines are "
                             f"skipped); '{STDIN}' reads standard input")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per review (text, label, probability, "
                             "probabilities, tokens, truncated) instead of a table")
    parser.add_argument("--model", help=(
        "base model (Hub name or folder) for an adapter checkpoint; default: the one recorded "
        f"in its {ADAPTER_CONFIG}"))
    add_calibration_argument(parser)
    for options in (ScoringPreprocessing, RuntimeOptions):
        add_options(parser, options)
    return parser


# ---------------------------------------------------------------------------------------------
# Reading the reviews


def read_lines(path: Path) -> list[str]:
    """The non-blank lines of a text file ('-' = standard input), without line endings."""
    if str(path) == STDIN:
        text = sys.stdin.read()
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError as error:
            raise UsageError(f"--file {path} does not exist") from error
        except (IsADirectoryError, UnicodeDecodeError) as error:
            raise UsageError(f"--file {path} is not a UTF-8 text file ({error})") from error
        except OSError as error:
            raise UsageError(f"--file {path} cannot be read ({error.strerror})") from error
    # Text mode has turned \r\n and \r into \n. Only \n ends a review: str.splitlines() would
    # also cut at \x85, \x0c, \u2028 and others, which reviews hold (\x85 is in 331 of IMDB's
    # 25,000 test reviews), and label each piece as a review of its own.
    return [line for line in text.split("\n") if line.strip()]


def collect_texts(texts: list[str], file: Path | None) -> list[str]:
    """The reviews to label: the TEXT arguments, then --file's lines; else standard input."""
    collected = [text for text in texts if text.strip()]
    if file is not None:
        collected += read_lines(file)
    elif not texts and not sys.stdin.isatty():
        collected += read_lines(Path(STDIN))
    if not collected:
        raise UsageError("no reviews to label: give them as arguments, with --file PATH, or "
                         "one per line on standard input")
    return collected


# ---------------------------------------------------------------------------------------------
# Predicting


def token_counts(tokenizer, texts: list[str]) -> list[int]:
    """Each text's full length in tokens ([CLS] and [SEP] included), before any truncation."""
    encoded = tokenizer(texts, truncation=False, return_attention_mask=False,
                        return_token_type_ids=False)
    return [len(ids) for ids in encoded["input_ids"]]


def predict_reviews(model: torch.nn.Module, tokenizer, texts: list[str],
                    preprocessing: Preprocessing, batch_size: int, device: torch.device,
                    precision: str, temperature: float = UNCALIBRATED) -> list[Prediction]:
    """Label `texts` in order, with the tokenizer, collator and loop evaluate.py uses; the
    probabilities are those of the logits divided by `temperature` (machinery/stats.py)."""
    # The collator and loader expect a label column; these placeholders are never read.
    reviews = Dataset.from_dict({TEXT: texts, LABEL: [0] * len(texts)}, features=FEATURES)
    collator = PaddingCollator(tokenizer.pad_token_id, device)
    max_length = preprocessing.max_length
    loader = make_loader(tokenize(reviews, tokenizer, max_length, preprocessing.truncation),
                         batch_size, collator, shuffle=False)
    logits, _ = predict_in_order(model, loader, device, precision, desc="Predicting")
    probabilities = softmax(scale_logits(logits, temperature))
    names = label_names_of(model)  # the classes the checkpoint was trained on
    predictions = []
    for text, probs, n_tokens in zip(texts, probabilities, token_counts(tokenizer, texts),
                                     strict=True):
        best = int(probs.argmax())
        predictions.append(Prediction(
            text=text, label=names[best], probability=float(probs[best]),
            probabilities={name: float(p) for name, p in zip(names, probs, strict=True)},
            tokens=n_tokens, truncated=n_tokens > max_length))
    return predictions


# ---------------------------------------------------------------------------------------------
# Output


def preview(text: str, width: int = PREVIEW_CHARS) -> str:
    """The text on one line, cut to `width` characters with an ellipsis."""
    one_line = " ".join(text.split())
    return one_line if len(one_line) <= width else one_line[:width - 1] + "…"


def format_table(predictions: list[Prediction], preprocessing: Preprocessing) -> str:
    """A table: number, label, probability, tokens (marked when truncated), start of the text."""
    rows = [["#", "label", "probability", "tokens", "text"]]
    for i, prediction in enumerate(predictions, start=1):
        mark = TRUNCATED_MARK if prediction.truncated else ""
        rows.append([str(i), prediction.label, f"{prediction.probability:.4f}",
                     f"{prediction.tokens}{mark}", preview(prediction.text)])
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    right_aligned = {0, 2, 3}
    lines = ["  ".join(cell.rjust(w) if i in right_aligned else cell.ljust(w)
                       for i, (cell, w) in enumerate(zip(row, widths, strict=True))).rstrip()
             for row in rows]
    n_truncated = sum(p.truncated for p in predictions)
    if n_truncated:
        lines.append(f"{TRUNCATED_MARK} truncated: "
                     f"{truncation_note(n_truncated, preprocessing)}")
    return "\n".join(lines)


def truncation_note(n_truncated: int, preprocessing: Preprocessing) -> str:
    """Why some texts were only partly read, and the flag that reads more."""
    reviews = "review is" if n_truncated == 1 else "reviews are"
    max_length, truncation = preprocessing.max_length, preprocessing.truncation
    return (f"{n_truncated} {reviews} longer than --max-length {max_length} tokens; only "
            f"{describe_truncation(max_length, truncation)} besides [CLS] and [SEP] were read "
            f"(--truncation {truncation}; raise --max-length to read more)")


def format_json_lines(predictions: list[Prediction]) -> str:
    """One JSON object per prediction, one per line."""
    return "\n".join(json.dumps(asdict(p), ensure_ascii=False) for p in predictions)


# ---------------------------------------------------------------------------------------------
# The predict.py command


def run(args: argparse.Namespace) -> list[Prediction]:
    """Load the checkpoint, label the reviews, print them; return the predictions."""
    texts = collect_texts(args.texts, args.file)
    device = pick_device(args.device)
    use_device(device)
    fill_device_defaults(args, device)
    precision = pick_precision(args.precision, device)
    folder = find_checkpoint(args.checkpoint)
    # The probabilities evaluate.py scores: divided by the checkpoint's fitted temperature.
    temperature = temperature_to_apply(folder, args.calibrate)
    model, tokenizer = load_checkpoint(folder, args.model)
    preprocessing = resolve_preprocessing(Preprocessing.recorded_in(folder), args.truncation,
                                          args.max_length, args.checkpoint)
    predictions = predict_reviews(model.to(device), tokenizer, texts, preprocessing,
                                  args.eval_batch_size, device, precision, temperature)
    if args.json:
        print(format_json_lines(predictions))
        n_truncated = sum(p.truncated for p in predictions)
        if n_truncated:
            print(f"Note: {truncation_note(n_truncated, preprocessing)}", file=sys.stderr)
    else:
        print(format_table(predictions, preprocessing))
    return predictions


def main(argv: list[str] | None = None) -> int:
    """Entry point of predict.py."""
    return run_command(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
