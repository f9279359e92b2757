# Adds tests/fuzz to a build without touching the top-level CMakeLists.txt:
#   cmake ... -DCMAKE_PROJECT_INCLUDE=<repo>/tests/fuzz/enable_fuzz.cmake
# (included by the top-level project() call; tests/fuzz/CMakeLists.txt is included once the
# top-level CMakeLists.txt has defined every library target: a deferred call may not add a
# subdirectory, so it is included into the top-level directory instead). See README.md.
# (EVAL: the path is expanded now; a deferred call's own arguments are expanded when it runs.)
cmake_language(EVAL CODE "cmake_language(DEFER DIRECTORY [[${CMAKE_SOURCE_DIR}]]
                          CALL include [[${CMAKE_CURRENT_LIST_DIR}/CMakeLists.txt]])")
