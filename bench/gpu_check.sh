#!/usr/bin/env bash
# The GPU check on a lent machine (no network there): install the wheels carried in bench/wheels/, then run
# bench/gpu_check.py on CUDA. JSON and log land in $OUT (the device tool brings that folder back).
#   here, once:        bash bench/gpu_check.sh --prepare   (downloads the wheels the GPU image lacks; < 64 MiB)
#   on the GPU:        bash bench/gpu_check.sh              (device tool: carry ["bench/wheels"])
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == "--prepare" ]]; then
  # pure-Python packages (and pydantic-core for CPython 3.12 x86_64) that the GPU image may not have;
  # bitsandbytes (~43 MB) only if the image lacks it: check with `pip show bitsandbytes` in a first short run
  pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
      -d bench/wheels datasets pydantic pydantic-core annotated-types typing-inspection trl gguf \
      pyarrow dill xxhash multiprocess evaluate
  # the liger part: liger-kernel is pure Python; the triton it needs comes with the image's CUDA build of torch
  pip download --no-deps --only-binary=:all: -d bench/wheels "liger-kernel>=0.8"
  # rouge_score ships only as an sdist (pure Python); pip builds it there without network
  pip download --no-deps --no-binary=:all: -d bench/wheels "rouge_score>=0.1.2"
  # DeepSpeed (an sdist; its ops compile on first use) and its pure-Python dependencies, for the deepspeed part
  pip download --no-deps --no-binary=:all: -d bench/wheels deepspeed
  pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
      -d bench/wheels hjson py-cpuinfo ninja msgpack
  du -sh bench/wheels
  exit 0
fi
if [[ -d bench/wheels ]]; then
  pip install -q --no-index --no-deps --no-build-isolation bench/wheels/*
fi
pip install -q --no-deps --no-build-isolation -e .
exec python bench/gpu_check.py --device cuda "$@"
