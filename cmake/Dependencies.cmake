# Every dependency comes from a Debian package installed by tools/bootstrap.sh.
find_package(Threads REQUIRED)
find_package(OpenMP REQUIRED)
find_package(dnnl CONFIG REQUIRED)            # libdnnl-dev (+ ocl-icd-opencl-dev for its config)
find_package(nlohmann_json CONFIG REQUIRED)   # safetensors headers
find_package(CLI11 CONFIG REQUIRED)
if(TUTEL_BUILD_TESTS)
  find_package(GTest CONFIG REQUIRED)
endif()
