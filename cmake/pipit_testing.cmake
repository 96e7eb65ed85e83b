# Test helpers for pipit's own test suite (not installed).
include(Catch)

# pipit_add_catch_test(<name> SOURCES ... [LIBS ...] [LABELS ...] [GPU])
#   One Catch2 executable, its test cases discovered by CTest as "<name>.<case>".
#   GPU: the executable uses pipit's GPU-aware main; its cases are labelled gpu and reported by
#   CTest as *skipped* (not passed) when no CUDA device is usable.
function(pipit_add_catch_test name)
  cmake_parse_arguments(ARG "GPU" "" "SOURCES;LIBS;LABELS" ${ARGN})
  add_executable(${name} ${ARG_SOURCES})
  target_link_libraries(${name} PRIVATE pipit::pipit ${ARG_LIBS})
  target_include_directories(${name} PRIVATE "${PROJECT_SOURCE_DIR}/tests")  # support/
  target_compile_options(${name} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Werror>
    $<$<COMPILE_LANGUAGE:CUDA>:-Xcompiler=-Wall,-Wextra -Werror=all-warnings>)
  set(labels ${ARG_LABELS})
  set(extra "")
  if(ARG_GPU)
    target_link_libraries(${name} PRIVATE pipit_gpu_test_main)
    list(APPEND labels gpu)
    set(extra [[SKIP_REGULAR_EXPRESSION "PIPIT_SKIP:"]])
  else()
    target_link_libraries(${name} PRIVATE Catch2::Catch2WithMain)
  endif()
  list(REMOVE_DUPLICATES labels)
  # -w NoTests: a discovered name that no longer matches a case fails instead of passing.
  catch_discover_tests(${name} TEST_PREFIX "${name}." TEST_LIST ${name}_TESTS EXTRA_ARGS -w NoTests)
  # Catch2 v2 cannot pass a list-valued property through discovery, so the labels (and the skip
  # rule) are applied by a second include file that CTest reads after the discovered list.
  set(props_file "${CMAKE_CURRENT_BINARY_DIR}/${name}_props.cmake")
  file(WRITE "${props_file}"
    "foreach(t IN LISTS ${name}_TESTS)\n"
    "  set_tests_properties(\"\${t}\" PROPERTIES LABELS \"${labels}\" ${extra})\n"
    "endforeach()\n")
  set_property(DIRECTORY APPEND PROPERTY TEST_INCLUDE_FILES "${props_file}")
endfunction()

# pipit_add_compile_fail_test(<file>)
#   <file> must fail to compile with a diagnostic matching the regular expression on its line
#   "// PIPIT_EXPECT_ERROR: <regex>". The same file compiled with -DPIPIT_COMPILE_FAIL_CONTROL
#   must compile, proving that the failure comes from the intended line.
function(pipit_add_compile_fail_test file)
  get_filename_component(stem "${file}" NAME_WE)
  file(STRINGS "${file}" expect REGEX "// PIPIT_EXPECT_ERROR: ")
  if(NOT expect)
    message(FATAL_ERROR "${file}: no '// PIPIT_EXPECT_ERROR: <regex>' line")
  endif()
  string(REGEX REPLACE ".*// PIPIT_EXPECT_ERROR: " "" regex "${expect}")
  set(libs pipit::pipit)
  if(file MATCHES "\\.cu$")
    if(NOT PIPIT_HAS_CUDA)
      return()
    endif()
    list(APPEND libs pipit::cuda)
  endif()
  foreach(kind ko ok)
    set(tgt compile_fail_${stem}_${kind})
    add_library(${tgt} OBJECT EXCLUDE_FROM_ALL "${file}")
    target_link_libraries(${tgt} PRIVATE ${libs})
    if(kind STREQUAL "ok")
      target_compile_definitions(${tgt} PRIVATE PIPIT_COMPILE_FAIL_CONTROL)
    endif()
    add_test(NAME compile_fail.${stem}.${kind}
      COMMAND ${CMAKE_COMMAND} --build "${PROJECT_BINARY_DIR}" --target ${tgt} --config $<CONFIG>)
  endforeach()
  # The failing build must print the expected diagnostic (and so must fail): the regular
  # expression decides, not the exit code. The control build must succeed.
  set_tests_properties(compile_fail.${stem}.ko PROPERTIES LABELS compile_fail
    PASS_REGULAR_EXPRESSION "${regex}" RESOURCE_LOCK pipit_build_tree)
  set_tests_properties(compile_fail.${stem}.ok PROPERTIES LABELS compile_fail
    RESOURCE_LOCK pipit_build_tree)
endfunction()
