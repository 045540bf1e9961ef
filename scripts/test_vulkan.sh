#!/usr/bin/env bash
# Everything a Vulkan check of llamabind needs, end to end, with the time of each step:
# system packages, new enough Vulkan headers, a Vulkan build in its own venv, the test
# models, and the Vulkan tests run on that venv. scripts/test.sh (so CI) runs it after
# the CPU suite.
#
#   scripts/test_vulkan.sh [--clean] [--build-only|--tests-only] [extra pytest arguments]
#
# --clean rebuilds from scratch (see scripts/build_vulkan.sh). --build-only stops after
# the build (and the test tools); --tests-only runs the tests on the venv a
# --build-only run made (scripts/test.sh runs the build beside the CPU tests). With no GPU the tests run
# on Mesa's lavapipe, a Vulkan device on the CPU. The tests compare greedy decoding on
# Vulkan with the CPU build's: LLAMABIND_CPU_PYTHON names the CPU build's interpreter
# (scripts/test.sh passes .venv's; default: .venv/bin/python when it exists, else the
# Vulkan build's own CPU backend serves as the reference).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${LLAMABIND_VULKAN_VENV:-$repo/build/venv-vulkan}
export LLAMABIND_VULKAN_VENV=$venv

build_args=() build=1 tests=1
while (($#)); do
  case $1 in
    --clean) build_args+=(--clean) ;;
    --build-only) tests=0 ;;
    --tests-only) build=0 ;;
    *) break ;;
  esac
  shift
done

timings=()
step() {  # step NAME COMMAND...: run it and record how long it took
  local name=$1 start=$SECONDS
  shift
  echo "=== test_vulkan: $name" >&2
  "$@"
  timings+=("$(printf '%-22s %5ds' "$name" $((SECONDS - start)))")
}
report() {
  local line cpu
  # CPU seconds of all this script ran (its finished children, user + system); `times`
  # runs in this shell, as in a pipe it would report a subshell's children, none
  local tf
  tf=$(mktemp)
  times >"$tf"
  cpu=$(awk 'NR == 2 { split($1, u, /[ms]/); split($2, s, /[ms]/)
                       printf "%.0f", u[1] * 60 + u[2] + s[1] * 60 + s[2] }' "$tf")
  rm -f "$tf"
  echo "=== test_vulkan: timings (wall; ${SECONDS}s in all, ${cpu} CPU s)" >&2
  for line in "${timings[@]}"; do echo "  $line" >&2; done
  # for scripts/test.sh's table when it runs this in the background
  [[ -z ${LLAMABIND_VULKAN_TIMES:-} ]] || echo "$SECONDS $cpu" >"$LLAMABIND_VULKAN_TIMES"
}
trap report EXIT

if ((build)); then
  step "system packages" "$repo/scripts/install_vulkan_deps.sh"
  step "Vulkan headers" "$repo/scripts/vulkan_headers.sh"
  step "Vulkan build" "$repo/scripts/build_vulkan.sh" "${build_args[@]}"
  step "test tools" "$venv/bin/python" -m pip install -q --disable-pip-version-check \
    "pytest>=8" "pytest-timeout>=2.3"
fi
((tests)) || exit 0
[[ -x $venv/bin/python ]] || { echo "test_vulkan: no Vulkan build in $venv" >&2; exit 1; }
step "test models" "$venv/bin/python" "$repo/models/fetch_models.py"
if [[ -z ${LLAMABIND_CPU_PYTHON:-} && -x $repo/.venv/bin/python ]]; then
  export LLAMABIND_CPU_PYTHON=$repo/.venv/bin/python
fi

# LLAMABIND_VULKAN_TESTS=1 turns the tests' skips into failures: a build that came out
# without Vulkan, or a Vulkan that sees no device, must not pass as skipped.
# GGML_VK_VISIBLE_DEVICES=0 lets ggml-vulkan use lavapipe (a CPU-type device it
# otherwise passes over); set it to choose another device.
cd "$repo"
step "Vulkan tests" env LLAMABIND_VULKAN_TESTS=1 \
  GGML_VK_VISIBLE_DEVICES="${GGML_VK_VISIBLE_DEVICES:-0}" \
  "$venv/bin/python" -m pytest -m vulkan tests/test_vulkan.py -v "$@"
