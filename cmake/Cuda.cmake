# TUTEL_CUDA=AUTO turns the CUDA backend on when nvcc is found. The CUDA code compiles in
# every build that has nvcc, even on machines without a GPU; its tests skip at run time.
# Never link the driver library (-lcuda): binaries must start where no driver exists.
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
message(STATUS "tuteld: CUDA backend ${TUTEL_HAVE_CUDA}")
