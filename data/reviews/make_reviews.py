"""Rebuild data/reviews/: short product reviews labelled positive or negative, a WordPiece
tokenizer built from them and a tiny BERT config, for configs/text_classification.json.

The files are committed, so training needs neither this script nor the network; it documents
where they came from: `python data/reviews/make_reviews.py` (needs tokenizers and transformers).
Reviews are drawn from templates with a fixed seed: the sentiment is carried by the adjective
or verb, and flipped by "not" or "never", so a model must read more than single words.
"""

import csv
import json
import random
from pathlib import Path

HERE = Path(__file__).parent
MODEL_DIR = HERE / "tiny-bert"

NOUNS = ["movie", "book", "phone", "camera", "hotel", "meal", "game", "song", "chair", "laptop", "show", "service"]
GOOD = ["good", "great", "excellent", "wonderful", "lovely", "amazing", "pleasant", "solid"]
BAD = ["bad", "awful", "terrible", "boring", "poor", "dreadful", "weak", "broken"]
LOVE, HATE = ["love", "like", "enjoy", "recommend"], ["hate", "dislike", "regret", "return"]
ADVERBS = ["", "really ", "very ", "quite ", "truly ", "rather "]
FILLER = ["", " overall", " to be honest", " for the price", " in my opinion", " this time", " again"]


def review(rng: random.Random) -> tuple[str, str]:
    positive = rng.random() < 0.5
    noun = rng.choice(NOUNS)
    negated = rng.random() < 0.3
    # A negated phrase carries the opposite word: "not good" is negative.
    word_is_good = positive != negated
    adjective = rng.choice(GOOD if word_is_good else BAD)
    verb = rng.choice(LOVE if word_is_good else HATE)
    no = rng.choice(["not ", "never "]) if negated else ""
    template = rng.randrange(4)
    if template == 0:
        text = f"the {noun} was {no}{rng.choice(ADVERBS)}{adjective}{rng.choice(FILLER)}"
    elif template == 1:
        text = f"i {'do not ' if negated else ''}{verb} this {noun}{rng.choice(FILLER)}"
    elif template == 2:
        text = f"{rng.choice(ADVERBS)}{adjective} {noun}{rng.choice(FILLER)}" if not negated else f"a {noun} that is {no}{adjective}"
    else:
        text = f"this {noun} is {no}{rng.choice(ADVERBS)}{adjective} and {'' if not negated else 'not '}{rng.choice(GOOD if word_is_good else BAD)}"
    return " ".join(text.split()), "positive" if positive else "negative"


def write_split(path: Path, rows: list[tuple[str, str]]) -> None:
    with open(path, "w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["text", "label"])
        writer.writerows(rows)


def main() -> None:
    rng = random.Random(0)
    rows = [review(rng) for _ in range(1500)]
    write_split(HERE / "train.csv", rows[:1200])
    write_split(HERE / "validation.csv", rows[1200:])

    from transformers import BertConfig, BertTokenizerFast

    words = sorted({word for text, _ in rows for word in text.split()})
    MODEL_DIR.mkdir(exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (HERE / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(str(HERE / "vocab.txt"), model_max_length=64)
    tokenizer.save_pretrained(str(MODEL_DIR))
    (HERE / "vocab.txt").unlink()
    BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
               max_position_embeddings=64).save_pretrained(str(MODEL_DIR))
    print(len(rows), "reviews,", len(vocab), "tokens:", sorted(p.name for p in MODEL_DIR.iterdir()))
    print(json.dumps(rows[:5], indent=1))


if __name__ == "__main__":
    main()
