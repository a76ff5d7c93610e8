#!/usr/bin/env bash
# For machines with no route to PyTorch's CPU index but a local folder of torch wheels (offline
# clusters, this project's CI): write a one-package simple index for uv under .torch-index/ and
# print the UV_INDEX value that serves it under the name pyproject.toml gives PyTorch's index.
#   export UV_INDEX=$(scripts/local_torch_index.sh /path/to/wheels)   # then `uv run ...` as usual
# Prints nothing (and writes nothing) when the folder holds no torch wheel.
set -euo pipefail
wheels=${1:?usage: $0 WHEEL_DIR}
root=$(cd "$(dirname "$0")/.." && pwd)/.torch-index
shopt -s nullglob
found=("$wheels"/torch-*.whl)
[ ${#found[@]} -gt 0 ] || exit 0
mkdir -p "$root/torch"
{
  echo '<!DOCTYPE html><html><body>'
  for w in "${found[@]}"; do
    w=$(cd "$(dirname "$w")" && pwd)/$(basename "$w")
    echo "<a href=\"file://$w\">$(basename "$w")</a>"
  done
  echo '</body></html>'
} >"$root/torch/index.html"
echo "pytorch-cpu=file://$root"
