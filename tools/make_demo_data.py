#!/usr/bin/env python
"""Write the procedural demo dataset (MCS2023 layout) so demos and smoke trainings need no download.

Example: python tools/make_demo_data.py --out data/demo --seed 0
"""

from __future__ import annotations

import argparse
import sys
import time

from vsearch_tf.demo import generate
from vsearch_tf.errors import VSearchError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="output folder (written atomically)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=150, help="number of train products")
    parser.add_argument("--val", type=int, default=30, help="number of validation products")
    parser.add_argument("--test", type=int, default=100, help="number of test products")
    parser.add_argument(
        "--users-per-product", type=int, default=3, help="shopper photos per product"
    )
    parser.add_argument("--seller-size", type=int, default=96, help="catalogue photo side, pixels")
    parser.add_argument("--user-size", type=int, default=160, help="shopper photo side, pixels")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --out folder")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        counts = generate(
            args.out,
            n_train=args.train,
            n_val=args.val,
            n_test=args.test,
            users_per_product=args.users_per_product,
            seed=args.seed,
            seller_size=args.seller_size,
            user_size=args.user_size,
            overwrite=args.overwrite,
        )
    except VSearchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(
        f"{args.out}: {counts['products']} products ({counts['train_products']} train / "
        f"{counts['val_products']} val / {counts['test_products']} test), "
        f"{counts['seller_images']} seller + {counts['user_images']} user images, "
        f"seed {args.seed}, {time.perf_counter() - start:.1f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
