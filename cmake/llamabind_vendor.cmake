# Helpers for building the vendored llama.cpp inside llamabind's package build.

# Make sure vendor/llama.cpp holds the pinned tree, fetching it when missing.
function(llamabind_fetch_vendor)
  file(READ ${LLAMABIND_PIN} pin_json)
  set(LLAMABIND_PIN_JSON "${pin_json}" PARENT_SCOPE)
  string(JSON pin_sha GET "${pin_json}" sha256)
  # the marker: the archive's sha256 and the patch list's (scripts/fetch_llama_cpp.py)
  get_filename_component(pin_dir ${LLAMABIND_PIN} DIRECTORY)
  file(SHA256 ${pin_dir}/llama-cpp-patches.json patch_sha)
  set(marker ${LLAMABIND_VENDOR}/.llamabind-pin)
  set(current "")
  if(EXISTS ${marker})
    file(STRINGS ${marker} current LIMIT_COUNT 1)
  endif()
  if(NOT current STREQUAL "${pin_sha} ${patch_sha}")
    message(STATUS "llamabind: fetching the pinned llama.cpp source")
    execute_process(
      COMMAND ${Python_EXECUTABLE} ${LLAMABIND_ROOT}/scripts/fetch_llama_cpp.py
      RESULT_VARIABLE rc)
    if(NOT rc EQUAL 0)
      message(FATAL_ERROR
        "llamabind: the pinned llama.cpp source is missing from vendor/llama.cpp and "
        "could not be fetched (see the message above). With no network, unpack it with "
        "'python scripts/fetch_llama_cpp.py' on a machine that has one, or build from "
        "llamabind's sdist, which carries it.")
    endif()
  endif()
endfunction()

# Stop early, with the packages to install, when a chosen backend cannot build here.
function(llamabind_check_backend_prerequisites)
  if(GGML_VULKAN)
    find_package(Vulkan COMPONENTS glslc)
    if(NOT Vulkan_FOUND OR NOT Vulkan_INCLUDE_DIR)
      message(FATAL_ERROR
        "llamabind: GGML_VULKAN=ON needs the Vulkan headers and loader. On Debian/Ubuntu: "
        "apt-get install libvulkan-dev glslc glslang-tools spirv-headers "
        "(and mesa-vulkan-drivers for the lavapipe CPU device). "
        "Point CMake at other headers with -DVulkan_INCLUDE_DIR=... "
        "(scripts/vulkan_headers.sh fetches new enough ones on Debian bookworm).")
    endif()
    if(NOT Vulkan_GLSLC_EXECUTABLE)
      message(FATAL_ERROR
        "llamabind: GGML_VULKAN=ON needs the glslc shader compiler: apt-get install glslc")
    endif()
    include(CheckCXXSourceCompiles)
    # check_cxx_source_compiles caches its result: without this, a configure that found
    # old headers keeps failing after -DVulkan_INCLUDE_DIR points at new ones (and one
    # that passed would keep passing after it points back at old ones).
    if(NOT "${Vulkan_INCLUDE_DIR}" STREQUAL "${LLAMABIND_VULKAN_HEADERS_CHECKED}")
      unset(LLAMABIND_VULKAN_HEADERS_NEW_ENOUGH CACHE)
    endif()
    set(LLAMABIND_VULKAN_HEADERS_CHECKED "${Vulkan_INCLUDE_DIR}" CACHE INTERNAL
        "the Vulkan include dir LLAMABIND_VULKAN_HEADERS_NEW_ENOUGH was checked for")
    set(CMAKE_REQUIRED_INCLUDES ${Vulkan_INCLUDE_DIR})
    set(CMAKE_REQUIRED_FLAGS "-std=c++17")
    check_cxx_source_compiles(
      "#include <vulkan/vulkan.hpp>\nint main() { vk::LayerSettingEXT s; (void)s; return 0; }"
      LLAMABIND_VULKAN_HEADERS_NEW_ENOUGH)
    if(NOT LLAMABIND_VULKAN_HEADERS_NEW_ENOUGH)
      message(FATAL_ERROR
        "llamabind: the Vulkan headers in ${Vulkan_INCLUDE_DIR} are too old for ggml-vulkan "
        "(no vk::LayerSettingEXT, needs Vulkan-Headers 1.3.275 or newer). On Debian bookworm "
        "run scripts/vulkan_headers.sh and pass the -DVulkan_INCLUDE_DIR it prints.")
    endif()
  endif()
  if(GGML_CUDA)
    include(CheckLanguage)
    check_language(CUDA)
    if(NOT CMAKE_CUDA_COMPILER)
      message(FATAL_ERROR
        "llamabind: GGML_CUDA=ON needs the CUDA toolkit (nvcc) on PATH or "
        "-DCMAKE_CUDA_COMPILER=/path/to/nvcc.")
    endif()
  endif()
endfunction()

# Options the user gave that no part of llama.cpp/ggml declared are almost always
# typos (GGML_VULKUN=ON would otherwise build a silent CPU-only package).
function(llamabind_reject_unknown_options)
  get_cmake_property(vars CACHE_VARIABLES)
  set(unknown "")
  foreach(var ${vars})
    if(var MATCHES "^(GGML|LLAMA)_")
      get_property(type CACHE ${var} PROPERTY TYPE)
      if(type STREQUAL "UNINITIALIZED" AND NOT var MATCHES "^(LLAMA_BUILD_NUMBER|LLAMA_BUILD_COMMIT)$")
        list(APPEND unknown ${var})
      endif()
    endif()
  endforeach()
  if(unknown)
    message(FATAL_ERROR
      "llamabind: unknown build option(s): ${unknown}. llama.cpp and ggml declare no such "
      "option; check the spelling (the options are listed in ggml/CMakeLists.txt and "
      "CMakeLists.txt of vendor/llama.cpp, and in llamabind's README).")
  endif()
endfunction()

# Record how llama.cpp was configured, for build_info() and for building the native
# reference tools with the very same options.
function(llamabind_write_build_config path)
  get_cmake_property(vars CACHE_VARIABLES)
  set(json "{}")
  foreach(var ${vars})
    if(var MATCHES "^(GGML|LLAMA)_" AND NOT var MATCHES "^LLAMABIND_")
      get_property(type CACHE ${var} PROPERTY TYPE)
      if(type STREQUAL "BOOL" OR type STREQUAL "STRING")
        string(REPLACE "\\" "\\\\" value "${${var}}")
        string(REPLACE "\"" "\\\"" value "${value}")
        string(JSON json SET "${json}" ${var} "\"${value}\"")
      endif()
    endif()
  endforeach()
  set(out "{}")
  string(JSON out SET "${out}" options "${json}")
  string(JSON out SET "${out}" llama_cpp_commit "\"${LLAMABIND_LLAMA_COMMIT}\"")
  string(JSON out SET "${out}" llama_cpp_version "\"${LLAMABIND_LLAMA_VERSION}\"")
  string(JSON out SET "${out}" build_type "\"${CMAKE_BUILD_TYPE}\"")
  string(JSON out SET "${out}" compiler "\"${CMAKE_CXX_COMPILER_ID} ${CMAKE_CXX_COMPILER_VERSION}\"")
  string(JSON out SET "${out}" system "\"${CMAKE_SYSTEM_NAME} ${CMAKE_SYSTEM_PROCESSOR}\"")
  if(Vulkan_INCLUDE_DIR)
    string(JSON out SET "${out}" vulkan_include_dir "\"${Vulkan_INCLUDE_DIR}\"")
  endif()
  file(WRITE ${path} "${out}\n")
endfunction()
