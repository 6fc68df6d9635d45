# The installed package, used from outside dcpp's tree:
#   1. `cmake --install` of the build tree under test into WORK/prefix;
#   2. a consumer project configured with find_package(dcpp) (CMAKE_PREFIX_PATH=prefix), built,
#      run: dcpp::dcpp and dcpp::mpi, and dcpp::torch when the build under test has it (WITH_TORCH);
#   3. the same program compiled with the flags `pkg-config --cflags --libs dcpp` gives, run;
#   4. the installed CLI inspects the consumer's checkpoint.
# cmake -DBUILD_DIR=... -DSOURCE_DIR=... -DWORK=... [-DWITH_TORCH=ON] -P consumer_test.cmake
foreach(v BUILD_DIR SOURCE_DIR WORK)
  if(NOT DEFINED ${v})
    message(FATAL_ERROR "${v} is not set")
  endif()
endforeach()
file(REMOVE_RECURSE ${WORK})
file(MAKE_DIRECTORY ${WORK})
set(prefix ${WORK}/prefix)

function(run)
  execute_process(COMMAND ${ARGV} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err
                  TIMEOUT 500)
  message(STATUS "$ ${ARGV}\n${out}${err}")
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGV}")
  endif()
  set(LAST_OUTPUT "${out}" PARENT_SCOPE)
endfunction()

run(${CMAKE_COMMAND} --install ${BUILD_DIR} --prefix ${prefix})
foreach(f include/dcpp/checkpoint.h bin/dcpp)
  if(NOT EXISTS ${prefix}/${f})
    message(FATAL_ERROR "not installed: ${f}")
  endif()
endforeach()
file(GLOB pc_files ${prefix}/lib*/pkgconfig/dcpp.pc ${prefix}/lib/*/pkgconfig/dcpp.pc)
list(GET pc_files 0 pc_file)
get_filename_component(pc_dir ${pc_file} DIRECTORY)

# 2. find_package(dcpp)
run(${CMAKE_COMMAND} -S ${SOURCE_DIR}/tests/package/consumer -B ${WORK}/cmake-build -G Ninja
    -DCMAKE_PREFIX_PATH=${prefix} -DCMAKE_BUILD_TYPE=Release -DWITH_TORCH=${WITH_TORCH})
run(${CMAKE_COMMAND} --build ${WORK}/cmake-build -j1)
run(${WORK}/cmake-build/consumer ${WORK}/ckpt_cmake)
run(${WORK}/cmake-build/consumer_mpi ${WORK}/ckpt_mpi)
if(WITH_TORCH)
  run(${WORK}/cmake-build/consumer_torch ${WORK}/ckpt_torch)
endif()

# 3. pkg-config
find_program(PKG_CONFIG pkg-config REQUIRED)
find_program(CXX NAMES c++ g++ clang++ REQUIRED)
execute_process(COMMAND ${CMAKE_COMMAND} -E env PKG_CONFIG_PATH=${pc_dir}
                ${PKG_CONFIG} --cflags --libs dcpp
                OUTPUT_VARIABLE flags OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "pkg-config dcpp failed")
endif()
message(STATUS "pkg-config --cflags --libs dcpp: ${flags}")
separate_arguments(flags UNIX_COMMAND "${flags}")
run(${CXX} -O1 ${SOURCE_DIR}/tests/package/consumer/consumer.cc -o ${WORK}/consumer_pc ${flags})
run(${WORK}/consumer_pc ${WORK}/ckpt_pc)
execute_process(COMMAND ${CMAKE_COMMAND} -E env PKG_CONFIG_PATH=${pc_dir}
                ${PKG_CONFIG} --cflags --libs dcpp-mpi
                OUTPUT_VARIABLE mpi_flags OUTPUT_STRIP_TRAILING_WHITESPACE RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "pkg-config dcpp-mpi failed")
endif()
separate_arguments(mpi_flags UNIX_COMMAND "${mpi_flags}")
run(${CXX} -O1 ${SOURCE_DIR}/tests/package/consumer/consumer_mpi.cc -o ${WORK}/consumer_mpi_pc
    ${mpi_flags})
run(${WORK}/consumer_mpi_pc ${WORK}/ckpt_mpi_pc)

# 4. the installed CLI
run(${prefix}/bin/dcpp inspect ${WORK}/ckpt_pc)
if(NOT LAST_OUTPUT MATCHES "w  float32\\[4, 3\\]")
  message(FATAL_ERROR "unexpected inspect output")
endif()
file(REMOVE_RECURSE ${WORK})
