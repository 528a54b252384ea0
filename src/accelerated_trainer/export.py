"""Export a run's best (or any) checkpoint for inference, and load it back.

    python -m accelerated_trainer.export runs/digits-mlp exported/digits
    model = accelerated_trainer.load_exported("exported/digits")     # built from its config

The export directory holds model.safetensors, trainer_config.json (the run's resolved config,
whose model_options rebuild the model) and meta.json, sealed with a manifest like every
checkpoint. The weights of a sharded `last` are put together from its shards. For a transformers model it is also a save_pretrained directory: the model's own
config.json and the tokenizer's files, which AutoModel*.from_pretrained and
AutoTokenizer.from_pretrained open.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .checkpoint import WEIGHTS, files
from .config import ConfigError, TrainerConfig

TRAINER_CONFIG = "trainer_config.json"  # not config.json: that name is a transformers model's own
# What a checkpoint holds for resuming or bookkeeping, left out of an export.
_NOT_EXPORTED = ("manifest.json", "meta.json", "state.json", "optimizer.safetensors", "optimizer.json")


def export_model(run_dir: str | Path, out_dir: str | Path, checkpoint: str = "best") -> Path:
    """Copy `checkpoint` (best, last, or a top/... path of the index) of a run to `out_dir`.

    Raises:
        ConfigError: the run or checkpoint is missing, or does not verify against its manifest.
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    source = run_dir / checkpoint
    shards = _shard_files(source)
    if not (source / WEIGHTS).is_file() and shards is None:
        raise ConfigError(f"export: {source} holds no {WEIGHTS}; choose best, last or a top/... entry of {run_dir / 'checkpoints.json'}.")
    if reason := files.verify(source):
        raise ConfigError(f"export: {source} does not verify ({reason}); export another checkpoint.")
    tmp = files.temporary_dir(out_dir)
    if shards is not None:  # a sharded `last`: its weights put together
        from .checkpoint import tensors
        from .checkpoint.store import read_weights

        tensors.write_tensors(tmp / WEIGHTS, read_weights(source), metadata={"format": "pt"})
    skipped = {*_NOT_EXPORTED, *(shards or ())}
    for path in source.iterdir():  # the weights, and a transformers model's config and tokenizer files
        if path.is_file() and path.name not in skipped and not path.name.startswith("rng-rank"):
            shutil.copy2(path, tmp / path.name)
    shutil.copy2(run_dir / "config.json", tmp / TRAINER_CONFIG)
    meta = files.read_json(source / "meta.json") if (source / "meta.json").is_file() else files.read_json(source / "state.json")
    files.write_json(tmp / "meta.json", {"source": str(source), **{k: meta.get(k) for k in ("epoch", "step", "monitor", "value", "metrics")}})
    files.seal(tmp)
    files.publish(tmp, out_dir)
    return out_dir


def _shard_files(source: Path) -> list[str] | None:
    """The files of a sharded checkpoint (its shards and sharded.json), or None for another one."""
    from .checkpoint.sharded import SHARDED, is_sharded_checkpoint

    if not is_sharded_checkpoint(source):
        return None
    return [SHARDED, *files.read_json(source / SHARDED)["shards"]]


def load_exported(directory: str | Path, model=None):
    """The exported model, in eval mode: `model` with the exported weights; else a transformers
    model by from_pretrained, or the model built from the trainer config's model_options."""
    from safetensors.torch import load_model

    from .models import build_model

    directory = Path(directory)
    if reason := files.verify(directory):
        raise ConfigError(f"{directory} is not a complete export: {reason}.")
    # Exports before trainer_config.json held the trainer's config as config.json.
    trainer_config = directory / TRAINER_CONFIG if (directory / TRAINER_CONFIG).is_file() else directory / "config.json"
    if model is None and trainer_config.name != "config.json" and (directory / "config.json").is_file():
        return _load_pretrained(directory)
    if model is None:
        config = TrainerConfig.model_validate(files.read_json(trainer_config))
        if config.model_options is None:
            raise ConfigError(f"{directory}: the run was trained from the Python API; pass the model: load_exported(dir, model=MyModel(...)).")
        model = build_model(config.model_options)
    load_model(model, str(directory / WEIGHTS))
    return model.eval()


def _load_pretrained(directory: Path):
    """A transformers model from an export: the class its config.json records, from_pretrained."""
    import transformers

    architectures = files.read_json(directory / "config.json").get("architectures") or ["AutoModel"]
    cls = getattr(transformers, architectures[0], transformers.AutoModel)
    return cls.from_pretrained(str(directory), local_files_only=True).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m accelerated_trainer.export", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="the run directory, {ckpt_dir}/{title}")
    parser.add_argument("out_dir", help="where to write the export (replaced if it exists)")
    parser.add_argument("--checkpoint", default="best", help="best (default), last, or a top/... path")
    args = parser.parse_args(argv)
    try:
        out = export_model(args.run_dir, args.out_dir, args.checkpoint)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported {Path(args.run_dir) / args.checkpoint} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
