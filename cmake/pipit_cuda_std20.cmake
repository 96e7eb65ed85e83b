# Teaches CMake 3.25.1 the nvcc flag for C++20 (CUDA20 support arrived in 3.25.2), so that
# CMAKE_CUDA_STANDARD 20 / cuda_std_20 work. Include after enable_language(CUDA); a no-op on
# newer CMake or when CUDA is not enabled. pipit's package config includes it for you.
if(CMAKE_CUDA_COMPILER_LOADED
   AND CMAKE_CUDA_COMPILER_ID STREQUAL "NVIDIA"
   AND CMAKE_CUDA_COMPILER_VERSION VERSION_GREATER_EQUAL 12.0
   AND NOT "cuda_std_20" IN_LIST CMAKE_CUDA_COMPILE_FEATURES)
  set(CMAKE_CUDA20_STANDARD_COMPILE_OPTION "-std=c++20")
  set(CMAKE_CUDA20_EXTENSION_COMPILE_OPTION "-std=c++20")
  list(APPEND CMAKE_CUDA_COMPILE_FEATURES cuda_std_20)
  set(CMAKE_CUDA20_COMPILE_FEATURES cuda_std_20)
endif()
