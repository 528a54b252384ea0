"""A transformers model trains unchanged: named input columns become keyword arguments, and the
labels go in so that the model returns its own loss."""

import datasets
import pytest
import torch
from torch import nn

from accelerated_trainer import AcceleratedTrainer

from conftest import digits_config


def token_rows(n=256, length=12, seed=0):
    """Padded token sequences; the label says whether the first token is one of the upper half."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 32, (n, length), generator=generator)
    lengths = torch.randint(4, length + 1, (n,), generator=generator)
    mask = (torch.arange(length) < lengths[:, None]).long()
    return {"input_ids": (ids * mask).tolist(), "attention_mask": mask.tolist(), "label": (ids[:, 0] >= 18).long().tolist()}


def test_sequence_classifier_from_a_local_config_trains_on_named_inputs(tmp_path):
    from transformers import AutoModelForSequenceClassification, BertConfig

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(BertConfig(
        vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=16, num_labels=2))
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append((args, sorted(kwargs))), with_kwargs=True)
    config = digits_config(tmp_path, dataset_options={"data_files": {}, "feature_columns": [], "validation_split": 0.25,
                                                      "input_columns": ["input_ids", "attention_mask"], "batch_size": 16},
                           training_options={"n_epochs": 4, "monitor": "val_loss", "loss_function": None,
                                             "optimizer": {"name": "AdamW", "lr": 0.002}, "scheduler": "constant", "save_top_k": 0})
    trainer = AcceleratedTrainer(model, config, train_dataset=datasets.Dataset.from_dict(token_rows()))
    result = trainer.train()

    assert seen[0] == ((), ["attention_mask", "input_ids", "labels"])
    assert result.steps == 4 * 12 and result.metrics["val_accuracy"] > 0.9, result.metrics
    # val_loss is the model's own loss (mean cross-entropy over the validation rows).
    validation = trainer.eval_loader.dataset.take(list(range(64)))
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=validation["input_ids"], attention_mask=validation["attention_mask"]).logits
    assert validation["input_ids"].dtype == torch.int64
    assert result.metrics["val_loss"] == pytest.approx(nn.functional.cross_entropy(logits, validation["labels"]).item(), rel=1e-4)


def test_causal_lm_on_packed_text_learns_the_next_token_not_the_one_after(tmp_path):
    """Packed text already shifts its labels by one; a transformers causal LM that got them would
    shift them again and learn the token after next. Its logits are scored against them instead."""
    from transformers import GPT2Config, GPT2LMHeadModel

    (tmp_path / "cycle.txt").write_text("abcdefg" * 300)  # period 7: the next token is certain
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=7, n_positions=8, n_embd=32, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0))
    config = digits_config(tmp_path, dataset_options={"data_files": {"train": str(tmp_path / "cycle.txt")}, "feature_columns": [], "label_column": "labels",
                                                      "text": {"tokenizer": "char", "block_size": 8}, "validation_split": 0.2,
                                                      "batch_size": 16},
                           training_options={"task": "language_modeling", "n_epochs": 6, "monitor": "val_loss", "loss_function": None,
                                             "optimizer": {"name": "AdamW", "lr": 0.01}, "scheduler": "constant", "save_top_k": 0})
    trainer = AcceleratedTrainer(model, config)
    result = trainer.train()

    assert result.metrics["val_accuracy"] > 0.95, result.metrics
    blocks = trainer.eval_loader.dataset.take(list(range(8)))  # token ids come as the first argument, `features`
    model.eval()
    with torch.no_grad():
        logits = model(blocks["features"]).logits
    assert torch.equal(logits.argmax(-1), blocks["labels"]), "position i predicts token i + 1"
