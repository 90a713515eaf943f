#!/usr/bin/env bash
# Every training objective on one tiny CPU run (examples/tiny_cpu.yaml: megatron's mock data and a
# random teacher — it shows the methods run side by side and what each costs in FLOPs, not which is
# better; `megatron-let quickstart` compares LET with the baseline on a real corpus and teacher).
#
#   bash examples/compare_tiny.sh [let|hld|all] [--train-iters N] [--work-dir DIR]
#
# let: the LET paper's comparison (Table 1/5): baseline (nll), LET, RKD, SALT, LET-logsum, LET-CCA.
# hld: the compute-matched paper's: NLL, KD, HLDC, HLDF (phase 1: the first half of the run).
# Each method trains in DIR/<method>/ (resumable: a finished run is skipped), then a table of the
# final LM loss and the FLOPs spent is printed. LET† (a teacher with another tokenizer) needs real
# tokenizers and text: see tests/test_retokenize.py and the README. FLOPs are counted per method and
# phase (megatron_let.flops, the compute-matched paper's A.9 convention): HLDF's phase 1 costs half the
# student, the regressor and the teacher up to its middle layer. For comparisons at equal compute
# rather than equal steps, see `megatron-let study` and training.flops_budget.
set -euo pipefail
cd "$(dirname "$0")/.."
which="${1:-all}"; shift || true
iters=20; work=compare_tiny
while [ $# -gt 0 ]; do
  case "$1" in
    --train-iters) iters="$2"; shift 2 ;;
    --work-dir) work="$2"; shift 2 ;;
    *) echo "compare_tiny.sh: unknown option $1" >&2; exit 2 ;;
  esac
done
KD="distillation.alpha=0.5 distillation.temperature=2.0 distillation.top_k=64"
declare -A METHODS=(
  [baseline]="method=nll"
  [let]="method=let"
  [rkd]="method=rkd $KD"
  [salt]="method=salt $KD distillation.stop_step=$(( iters / 2 > 0 ? iters / 2 : 1 ))"
  [let_logsum]="method=let alignment.loss=logsum"
  [let_cca]="method=let alignment.loss=cca"
  [nll]="method=nll"
  [kd]="method=kd $KD"
  [hldc]="method=hldc $KD hld.gamma=0.05"
  [hldf]="method=hldf $KD hld.phase1_iters=$(( iters / 2 > 0 ? iters / 2 : 1 )) hld.phase1_warmup_iters=$(( iters / 4 ))"
)
case "$which" in
  let) order="baseline let rkd salt let_logsum let_cca" ;;
  hld) order="nll kd hldc hldf" ;;
  all) order="baseline let rkd salt let_logsum let_cca kd hldc hldf" ;;
  *) echo "compare_tiny.sh: expected let, hld or all, got $which" >&2; exit 2 ;;
esac
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
for method in $order; do
  sets=(--set "training.train_iters=$iters" --set "checkpoint.save=$work/$method" --set "checkpoint.load=$work/$method")
  for item in ${METHODS[$method]}; do sets+=(--set "$item"); done
  echo "== $method: ${METHODS[$method]}"
  python -m megatron_let.train --config examples/tiny_cpu.yaml "${sets[@]}" | grep -E "^(hldc|hldf|kd|rkd|salt|LET)|iteration +$iters/|finished"
done
python - "$work" $order <<'PY'
import json, sys
from pathlib import Path
work, methods = Path(sys.argv[1]), sys.argv[2:]
print(f"\n{'method':<12} {'final lm loss':>14} {'FLOPs spent':>12}")
for m in methods:
    rows = [json.loads(l) for l in (work / m / "metrics.jsonl").read_text().splitlines() if '"split"' not in l]
    loss = rows[-1]["lm_loss"]  # None: HLDF still in phase 1 (no LM loss computed)
    print(f"{m:<12} {'-' if loss is None else f'{loss:.4f}':>14} {rows[-1]['flops_total']:>12.3e}")
PY
