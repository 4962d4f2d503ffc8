#!/usr/bin/env bash
# make gpu-check: install the CUDA stack into .venv-gpu (next to the CPU .venv), then run
# benchmarks/gpu_check.py on one GPU: train baseline + distilled students, resume a CPU
# checkpoint on the GPU, quantized lookups on the GPU against the CPU kernels, teacher texts/s.
# One table on stdout, JSON in runs/gpu_check/gpu_check.json.
#
#   bash scripts/gpu_check.sh                   # CUDA 12.6 build of torch (default)
#   CUDA_FLAVOR=cu130 bash scripts/gpu_check.sh # CUDA 13.0 build
#   TORCH_INDEX_URL=... bash scripts/gpu_check.sh   # a mirror of PyTorch's wheel index
#
# Exit status: 0 all checks passed, 1 a check failed, 2 no GPU / bad setting (nothing installed).
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
  echo "       On CPU machines use make test; the CUDA paths are described in README (GPU status)." >&2
  exit 2
fi
# PyTorch's own wheel index for this CUDA build (torch and the fbgemm-gpu built against it)
TORCH_INDEX_URL="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/$CUDA_FLAVOR}"

VENV=.venv-gpu
PY="$VENV/bin/python"
STAMP="$VENV/.installed-$CUDA_FLAVOR"
if [ ! -f "$STAMP" ] || [ requirements.lock -nt "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; then
  test -x "$PY" || "${PYTHON:-python3}" -m venv "$VENV"
  rm -f "$VENV"/.installed-*
  echo "installing the CUDA stack ($CUDA_FLAVOR) into $VENV ..."
  "$PY" -m pip install --quiet --upgrade pip
  # torch with its CUDA libraries, then the fbgemm-gpu made for exactly that torch and CUDA
  "$PY" -m pip install --quiet "torch==2.13.0" --index-url "$TORCH_INDEX_URL"
  "$PY" -m pip install --quiet "fbgemm-gpu==1.8.0" --index-url "$TORCH_INDEX_URL"
  # torchrec without its dependency pins; then everything else exactly as the CPU stack pins it
  "$PY" -m pip install --quiet --no-deps "torchrec==1.8.0"
  grep -v -E '^(torch|fbgemm_gpu-cpu|fbgemm-gpu-cpu|torchrec)==' requirements.lock > "$VENV/requirements.rest"
  "$PY" -m pip install --quiet --no-deps -r "$VENV/requirements.rest"
  "$PY" -m pip install --quiet --no-deps --no-build-isolation -e .
  "$PY" -c "import torch, fbgemm_gpu, torchrec; assert torch.cuda.is_available(), 'the installed torch sees no GPU'; print('CUDA stack OK: torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"
  touch "$STAMP"
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PATH="$PWD/$VENV/bin:$PATH"
exec timeout "${GPU_CHECK_TIMEOUT_S:-420}" "$PY" benchmarks/gpu_check.py "$@"
