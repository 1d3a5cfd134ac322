#!/bin/bash
# Issue #16's figures. Stage "val": export the recipe's final embedder (xbm_1st) with the
# localizer, check it, index the validation gallery and score the validation queries with the
# multi-crop fallback at each threshold given (to choose one). Stage "test": index the test
# gallery, score the test queries with given / predicted / no boxes and the fallback at the
# chosen threshold.
# Usage: bench_localizer.sh val LOCALIZER_RUN OUT_DIR T1 T2 ... | bench_localizer.sh test LOCALIZER_RUN OUT_DIR T
# Environment: DATA (emoji-shop), SPLIT (the recipe run's split/), EMBEDDER (its final run),
# VSEARCH (the command).
set -euo pipefail
STAGE=$1; LOC=$2; OUT=$3; shift 3
V="${VSEARCH:-python -m vsearch_tf}"
D=${DATA:-../shared/data/emoji-shop}
S=${SPLIT:-runs/recipe-split/split}
if [ "$STAGE" = val ]; then
  $V export ${EMBEDDER:-runs/recipe-split/xbm_1st} --name xbm_localizer --root $OUT/sm --localizer $LOC
  $V export --check $OUT/sm/xbm_localizer > $OUT/check.txt
  $V index --model $OUT/sm/xbm_localizer --gallery $S/val_gallery.csv --root $D --out $OUT/val_index
  for SRC in given predicted none; do
    $V eval --index $OUT/val_index --queries $S/val_queries.csv --root $D --box-source $SRC --out $OUT/val_$SRC.json > /dev/null
  done
  for T in "$@"; do
    $V eval --index $OUT/val_index --queries $S/val_queries.csv --root $D --box-source predicted --fallback-below $T --out $OUT/val_fallback_$T.json > /dev/null
  done
else
  $V index --model $OUT/sm/xbm_localizer --gallery $D/gallery.csv --root $D --out $OUT/index
  for SRC in given predicted none; do
    $V eval --index $OUT/index --queries $D/queries.csv --root $D --box-source $SRC --out $OUT/test_$SRC.json > /dev/null
  done
  $V eval --index $OUT/index --queries $D/queries.csv --root $D --box-source predicted --fallback-below $1 --out $OUT/test_fallback_$1.json > /dev/null
fi
