# TUTEL_CUDA=AUTO turns the CUDA backend on when nvcc is found. The CUDA code compiles in
# every build that has nvcc, even on machines without a GPU; its tests skip at run time.
# Never link the CUDA driver library itself: binaries must start where no
# driver exists. Driver entry points, if ever needed, are loaded at run time through
# cudaGetDriverEntryPoint.
set(TUTEL_HAVE_CUDA OFF)
if(NOT TUTEL_CUDA STREQUAL "OFF")
  if(NOT CMAKE_CUDA_COMPILER AND EXISTS /usr/local/cuda/bin/nvcc)
    set(CMAKE_CUDA_COMPILER /usr/local/cuda/bin/nvcc)
  endif()
  include(CheckLanguage)
  check_language(CUDA)
  if(CMAKE_CUDA_COMPILER)
    set(TUTEL_HAVE_CUDA ON)
  elseif(TUTEL_CUDA STREQUAL "ON")
    message(FATAL_ERROR "TUTEL_CUDA=ON but nvcc was not found; install the CUDA toolkit or use -DTUTEL_CUDA=AUTO")
  endif()
endif()

if(TUTEL_HAVE_CUDA)
  # H200 (sm_90) by default; override with -DCMAKE_CUDA_ARCHITECTURES=... Must be set before
  # enable_language: CMake's own default is older than what nvcc 13 still supports.
  if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES OR CMAKE_CUDA_ARCHITECTURES STREQUAL "")
    set(CMAKE_CUDA_ARCHITECTURES 90 CACHE STRING "CUDA architectures to build for (90 = H100/H200)" FORCE)
  endif()
  # CMake 3.25 knows no C++20 dialect for CUDA: .cu files are C++17 and include no core/ header.
  set(CMAKE_CUDA_STANDARD 17)
  set(CMAKE_CUDA_STANDARD_REQUIRED ON)
  set(CMAKE_CUDA_EXTENSIONS OFF)
  set(CMAKE_CUDA_RUNTIME_LIBRARY Shared)
  enable_language(CUDA)
  find_package(CUDAToolkit REQUIRED)

  # Flags for our own .cu files (link it PRIVATE): host-compiler warnings as for C++, line info
  # for compute-sanitizer and profilers. No fast-math: the gate must stay IEEE.
  add_library(tutel_cuda_flags INTERFACE)
  target_compile_options(tutel_cuda_flags INTERFACE
    $<$<COMPILE_LANGUAGE:CUDA>:-lineinfo -Xcompiler=-Wall,-Wextra,-Wno-unused-parameter>)

  # NCCL ships with the toolkit here (/usr/local/cuda/lib64/libnccl.so); comm/ links tutel::nccl.
  # GPU images made for PyTorch carry it as the nvidia-nccl wheel instead (site-packages/nvidia/
  # nccl: lib/libnccl.so.2, no unversioned name, and include/nccl.h): the python3 on the PATH
  # says where, and is searched after the toolkit.
  set(_tutel_nccl_wheel_lib "")
  set(_tutel_nccl_wheel_include "")
  find_program(TUTEL_PYTHON3 NAMES python3)
  if(TUTEL_PYTHON3)
    execute_process(
      COMMAND "${TUTEL_PYTHON3}" -c "import nvidia.nccl as m; print(list(m.__path__)[0])"
      OUTPUT_VARIABLE _tutel_nccl_wheel OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET)
    if(_tutel_nccl_wheel AND EXISTS "${_tutel_nccl_wheel}/include/nccl.h")
      set(_tutel_nccl_wheel_lib "${_tutel_nccl_wheel}/lib")
      set(_tutel_nccl_wheel_include "${_tutel_nccl_wheel}/include")
    endif()
  endif()
  find_library(TUTEL_NCCL_LIBRARY NAMES nccl libnccl.so.2
    HINTS ${CUDAToolkit_LIBRARY_DIR} ${CUDAToolkit_LIBRARY_ROOT}/lib64 /usr/local/cuda/lib64
    PATHS ${_tutel_nccl_wheel_lib})
  find_path(TUTEL_NCCL_INCLUDE_DIR NAMES nccl.h
    HINTS ${CUDAToolkit_INCLUDE_DIRS} /usr/local/cuda/include
    PATHS ${_tutel_nccl_wheel_include})
  if(TUTEL_NCCL_LIBRARY AND TUTEL_NCCL_INCLUDE_DIR)
    add_library(tutel::nccl SHARED IMPORTED GLOBAL)
    set_target_properties(tutel::nccl PROPERTIES
      IMPORTED_LOCATION "${TUTEL_NCCL_LIBRARY}"
      INTERFACE_INCLUDE_DIRECTORIES "${TUTEL_NCCL_INCLUDE_DIR}"
      INTERFACE_LINK_LIBRARIES CUDA::cudart)
    set(TUTEL_HAVE_NCCL ON)
  else()
    set(TUTEL_HAVE_NCCL OFF)
    message(STATUS "tuteld: NCCL not found (libnccl.so, nccl.h); tutel::nccl is not defined")
  endif()
  message(STATUS "tuteld: CUDA ${CUDAToolkit_VERSION}, architectures ${CMAKE_CUDA_ARCHITECTURES}, NCCL ${TUTEL_HAVE_NCCL}")
endif()
message(STATUS "tuteld: CUDA backend ${TUTEL_HAVE_CUDA}")
