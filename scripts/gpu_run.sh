#!/usr/bin/env bash
# The course's one GPU run (scripts/gpu_run.py holds the plan: 8 minutes of training, then the benchmarks).
#
#   bash scripts/gpu_run.sh prepare        # here: the wheels and the CIFAR archive that travel, into .gpu/ (ignored)
#   bash scripts/gpu_run.sh device         # on the device, from the tree's root, with $OUT set: install, train, measure
#   bash scripts/gpu_run.sh dry-run [OUT]  # here, on the CPU: the device path with tiny budgets (the test suite runs it)
#
# The device's image has torch, transformers, peft and accelerate, but no diffusers: `prepare` downloads diffusers as
# a wheel (its dependencies are transformers' too), and `device` installs it only if it does not import, with
# --no-index --no-deps --target (nothing is fetched there). matplotlib does not travel (with it the carry would be
# 72 MiB of the 64 allowed): `train` and `bench` run without it, and bench then skips its figure. The tree carries no .git: `prepare` writes the
# commit into .gpu/commit, and the run records it (MINILCM_GIT_COMMIT). The device command, for the `run` tool:
#   bash scripts/gpu_run.sh device           with carry [".gpu"] and a timeout that leaves room for one retry
set -euo pipefail
cd "$(dirname "$0")/.."
G=.gpu
PY=${PYTHON:-python3}
# module to import -> wheel to install when it does not import
WHEELS="diffusers:diffusers"

install_missing() {  # $1: python, $2: target folder
  local py=$1 target=$2 need=()
  for pair in $WHEELS; do
    mod=${pair%%:*} whl=${pair##*:}
    # a dry run installs every wheel (FORCE_INSTALL=1), so that the install path is tested where all of them import
    if [[ ${FORCE_INSTALL:-0} == 1 ]] || ! PYTHONPATH="$target" "$py" -c "import $mod" 2>/dev/null; then need+=("$whl"); fi
  done
  if ((${#need[@]})); then
    echo "installing from $G/wheels: ${need[*]}"
    "$py" -m pip install -q --no-index --no-deps --find-links "$G/wheels" --target "$target" "${need[@]}"
  fi
}

case "${1:-}" in
  prepare)
    mkdir -p "$G/wheels"
    DIFFUSERS=$(.venv/bin/python -c "import diffusers; print(diffusers.__version__)")
    specs=("diffusers==$DIFFUSERS")
    for pair in $WHEELS; do [[ ${pair##*:} == diffusers ]] || specs+=("${pair##*:}"); done
    # diffusers is pure Python: the same wheel installs on the device's Python (3.12 there, 3.11 here)
    .venv/bin/pip download -q --no-deps --dest "$G/wheels" --only-binary=:all: "${specs[@]}"
    cifar=${MINILCM_CIFAR:-../shared/data/cifar10-jpeg.tar.gz}
    cp "$cifar" "$G/cifar10-jpeg.tar.gz"
    git rev-parse HEAD > "$G/commit"
    if [[ -n "$(git status --porcelain --untracked-files=no)" ]]; then echo 1 > "$G/dirty"; else echo 0 > "$G/dirty"; fi
    # what the device run carries: tracked and untracked-not-ignored files that exist, and .gpu/
    read -r tree untracked carried < <(.venv/bin/python - "$G" <<'PY'
import os, subprocess, sys
def size(args):
    names = subprocess.run(["git", *args, "-z"], capture_output=True, text=True, check=True).stdout.split("\0")
    return sum(os.path.getsize(n) for n in names if n and os.path.isfile(n))
g = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(sys.argv[1]) for f in fs)
print(size(["ls-files"]), size(["ls-files", "--others", "--exclude-standard"]), g)
PY
)
    total=$(( tree + untracked + carried ))
    echo "travels: tree $((tree / 1048576)) MiB + untracked $((untracked / 1048576)) MiB + $G $((carried / 1048576)) MiB = $((total / 1048576)) MiB (limit 64)"
    ls -la "$G/wheels"
    (( total <= 64 * 1048576 )) || { echo "over the 64 MiB a device run carries" >&2; exit 1; }
    ;;
  device|dry-run)
    mode=$1
    if [[ $mode == device ]]; then
      : "${OUT:?set OUT to the folder that comes back}"
      out=$OUT; target="$PWD/$G/site"; args=()
    else
      work=${GPU_RUN_WORK:-runs/gpu-dry-run}
      [[ $work == /* ]] || work="$PWD/$work"
      out=${2:-$work/out}; target="$work/site"; args=(--dry-run --work "$work")
      PY=${PYTHON:-.venv/bin/python}; FORCE_INSTALL=1
    fi
    test -d "$G/wheels" || { echo "no $G/wheels: run 'bash scripts/gpu_run.sh prepare' first" >&2; exit 2; }
    mkdir -p "$target" "$out"
    install_missing "$PY" "$target"
    export PYTHONPATH="$target:$PWD${PYTHONPATH:+:$PYTHONPATH}"
    export MINILCM_CIFAR="$PWD/$G/cifar10-jpeg.tar.gz" MPLBACKEND=Agg
    export MINILCM_GIT_COMMIT=$(cat "$G/commit") MINILCM_GIT_DIRTY=$(cat "$G/dirty")
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
    "$PY" scripts/gpu_run.py "$out" "${args[@]}"
    ;;
  *)
    echo "usage: bash scripts/gpu_run.sh prepare | device | dry-run [OUT]" >&2
    exit 2
    ;;
esac
