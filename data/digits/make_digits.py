"""Rebuild data/digits/{train,validation}.parquet from scikit-learn's bundled UCI digits.

The parquet files are committed, so training never needs scikit-learn or the network; this
script documents where they came from: `python data/digits/make_digits.py` (needs scikit-learn).
"""

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.datasets import load_digits

HERE = Path(__file__).parent


def main() -> None:
    digits = load_digits()
    # Pixels are 0..16; scale to 0..1 so the default learning rate suits them.
    pixels = (digits.data / 16.0).astype(np.float32)
    order = np.random.default_rng(0).permutation(len(pixels))
    n_validation = len(pixels) // 5
    for split, rows in (("validation", order[:n_validation]), ("train", order[n_validation:])):
        table = pa.table({
            "pixels": pa.array(list(pixels[rows]), type=pa.list_(pa.float32(), 64)),
            "label": pa.array(digits.target[rows].astype(np.int64)),
        })
        pq.write_table(table, HERE / f"{split}.parquet")
        print(split, table.num_rows)


if __name__ == "__main__":
    main()
