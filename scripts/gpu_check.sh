#!/usr/bin/env bash
# make gpu-check: install the CUDA stack into .venv-gpu (next to the CPU .venv), then run
# benchmarks/gpu_check.py (its --help lists the checks: training on 1 and 2 GPUs, compress ->
# artifact -> Predictor on CUDA, a UVM-caching table, Parquet through pinned workers, the teacher,
# CPU -> GPU resume). One table on stdout, JSON in runs/gpu_check/gpu_check.json.
# Needs only the NVIDIA driver and python3 (with venv) on the machine.
#
#   bash scripts/gpu_check.sh                   # CUDA 12.6 build of torch (default)
#   CUDA_FLAVOR=cu130 bash scripts/gpu_check.sh # CUDA 13.0 build
#   TORCH_INDEX_URL=... bash scripts/gpu_check.sh   # a mirror of PyTorch's wheel index
#   bash scripts/gpu_check.sh --only env train_gpu  # arguments go to benchmarks/gpu_check.py
#
# Switching CUDA_FLAVOR reinstalls torch and fbgemm-gpu for the new CUDA; the stamp
# ($VENV/.installed-FLAVOR) is written only once torch reports that CUDA and an fbgemm_gpu CUDA
# operator works. GPU_VENV picks another folder than .venv-gpu.
#
# Exit status: 0 all checks passed, 1 a check failed, 2 no GPU / bad setting / the install is not
# the CUDA stack asked for (nothing stamped).
set -euo pipefail
cd "$(dirname "$0")/.."

CUDA_FLAVOR="${CUDA_FLAVOR:-cu126}"
case "$CUDA_FLAVOR" in
  cu126|cu130) ;;
  *) echo "error: CUDA_FLAVOR=$CUDA_FLAVOR: expected cu126 or cu130 (PyTorch publishes torch 2.12+ for CUDA 12.6 and 13.0; there is no cu128 build)" >&2
     exit 2 ;;
esac
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
  echo "error: no NVIDIA GPU visible (nvidia-smi is missing or fails): make gpu-check needs a CUDA machine." >&2
  echo "       On CPU machines use make test; docs/GPU.md says what has run where." >&2
  exit 2
fi
# PyTorch's own wheel index for this CUDA build (torch and the fbgemm-gpu built against it)
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/$CUDA_FLAVOR}"
WANT_CUDA="${CUDA_FLAVOR:2:2}.${CUDA_FLAVOR:4}"  # cu126 -> 12.6, cu130 -> 13.0, as torch.version.cuda says

VENV="${GPU_VENV:-.venv-gpu}"
PY="$VENV/bin/python"
STAMP="$VENV/.installed-$CUDA_FLAVOR"
if [ ! -f "$STAMP" ] || [ requirements.lock -nt "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  test -x "$PY" || "${PYTHON:-python3}" -m venv "$VENV"
  rm -f "$VENV"/.installed-*
  echo "installing the CUDA stack ($CUDA_FLAVOR) into $VENV ..."
  "$PY" -m pip install --quiet --upgrade pip
  # pip takes an installed 2.13.0+cu126 as meeting "torch==2.13.0" (it ignores the local label),
  # so a torch of another build (another CUDA, or CPU) is replaced by force, fbgemm-gpu with it
  HAVE_CUDA=$("$PY" -c "import torch; print(torch.version.cuda or 'cpu')" 2>/dev/null || echo none)
  FORCE=()
  if [ "$HAVE_CUDA" != none ] && [ "$HAVE_CUDA" != "$WANT_CUDA" ]; then
    echo "  $VENV holds torch for CUDA $HAVE_CUDA: reinstalling torch and fbgemm-gpu for $CUDA_FLAVOR"
    FORCE=(--force-reinstall)
  fi
  # fbgemm-gpu-cpu installs the same fbgemm_gpu package as fbgemm-gpu: never both
  if "$PY" -m pip show --quiet fbgemm-gpu-cpu >/dev/null 2>&1; then
    echo "  removing fbgemm-gpu-cpu (it shadows the CUDA fbgemm-gpu)"
    "$PY" -m pip uninstall --quiet -y fbgemm-gpu-cpu
    FORCE=(--force-reinstall)
  fi
  # torch with its CUDA libraries, then the fbgemm-gpu made for exactly that torch and CUDA
  "$PY" -m pip install --quiet ${FORCE[@]+"${FORCE[@]}"} "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
  "$PY" -m pip install --quiet ${FORCE[@]+"${FORCE[@]}"} "fbgemm-gpu==1.8.0" --index-url "$TORCH_INDEX_URL"
  # torchrec without its dependency pins; then everything else exactly as the CPU stack pins it
  "$PY" -m pip install --quiet --no-deps "torchrec==1.8.0"
  grep -v -E '^(torch|fbgemm_gpu-cpu|fbgemm-gpu-cpu|fbgemm_gpu|fbgemm-gpu|torchrec)==' requirements.lock > "$VENV/requirements.rest"
  "$PY" -m pip install --quiet --no-deps -r "$VENV/requirements.rest"
  "$PY" -m pip install --quiet --no-deps --no-build-isolation -e .
  # stamp only the stack asked for: torch built for WANT_CUDA, seeing a GPU, an fbgemm_gpu CUDA op
  if ! "$PY" - "$WANT_CUDA" <<'PYCHECK'
import sys

import torch

want = sys.argv[1]
if torch.version.cuda != want:
    sys.exit(f"error: torch {torch.__version__} is built for CUDA {torch.version.cuda}, not {want}: the install did not switch builds")
if not torch.cuda.is_available():
    sys.exit(f"error: torch {torch.__version__} sees no GPU (is the driver too old for CUDA {want}? try CUDA_FLAVOR=cu126)")
import fbgemm_gpu  # noqa: E402,F401  registers torch.ops.fbgemm
import torchrec  # noqa: E402,F401

x = torch.ops.fbgemm.asynchronous_complete_cumsum(torch.tensor([1, 2], dtype=torch.int32, device="cuda"))
if x.cpu().tolist() != [0, 1, 3]:
    sys.exit("error: fbgemm_gpu's CUDA operator gives wrong results")
print("CUDA stack OK: torch", torch.__version__, "CUDA", torch.version.cuda, torch.cuda.get_device_name(0))
PYCHECK
  then
    echo "error: $VENV does not hold the CUDA stack asked for ($CUDA_FLAVOR); nothing stamped, the next run installs again" >&2
    exit 2
  fi
  touch "$STAMP"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
case "$VENV" in /*) VBIN="$VENV/bin" ;; *) VBIN="$PWD/$VENV/bin" ;; esac
export PATH="$VBIN:$PATH"
# gpu_check.py holds each check to its own limit and all of them to --budget-s (390 s by default),
# writing its JSON after every check; this timeout is only a backstop
exec timeout "${GPU_CHECK_TIMEOUT_S:-450}" "$PY" benchmarks/gpu_check.py "$@"
