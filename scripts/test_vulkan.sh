#!/usr/bin/env bash
# Everything a Vulkan check of llamabind needs, end to end, with the time of each step:
# system packages, new enough Vulkan headers, a Vulkan build in its own venv, the test
# model, and the Vulkan tests run on that venv.
#
#   scripts/test_vulkan.sh [--clean] [extra pytest arguments]
#
# --clean rebuilds from scratch (see scripts/build_vulkan.sh). With no GPU the tests run
# on Mesa's lavapipe, a Vulkan device on the CPU.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${LLAMABIND_VULKAN_VENV:-$repo/build/venv-vulkan}
export LLAMABIND_VULKAN_VENV=$venv

build_args=()
if [[ ${1:-} == --clean ]]; then
  build_args+=(--clean)
  shift
fi

timings=()
step() {  # step NAME COMMAND...: run it and record how long it took
  local name=$1 start=$SECONDS
  shift
  echo "=== test_vulkan: $name" >&2
  "$@"
  timings+=("$(printf '%-22s %5ds' "$name" $((SECONDS - start)))")
}
report() {
  local line
  echo "=== test_vulkan: timings" >&2
  for line in "${timings[@]}"; do echo "  $line" >&2; done
}
trap report EXIT

step "system packages" "$repo/scripts/install_vulkan_deps.sh"
step "Vulkan headers" "$repo/scripts/vulkan_headers.sh"
step "Vulkan build" "$repo/scripts/build_vulkan.sh" "${build_args[@]}"
step "test tools" "$venv/bin/python" -m pip install -q "pytest>=8" "pytest-timeout>=2.3"
step "test model" "$venv/bin/python" "$repo/models/fetch_models.py" smollm2

# LLAMABIND_VULKAN_TESTS=1 turns the tests' skips into failures: a build that came out
# without Vulkan, or a Vulkan that sees no device, must not pass as skipped.
# GGML_VK_VISIBLE_DEVICES=0 lets ggml-vulkan use lavapipe (a CPU-type device it
# otherwise passes over); set it to choose another device.
cd "$repo"
step "Vulkan tests" env LLAMABIND_VULKAN_TESTS=1 \
  GGML_VK_VISIBLE_DEVICES="${GGML_VK_VISIBLE_DEVICES:-0}" \
  "$venv/bin/python" -m pytest -m vulkan tests/test_vulkan.py -v "$@"
