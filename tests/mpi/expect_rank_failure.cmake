# Runs a save in which one rank's storage fails and checks it from outside the job:
#   - the job ends (no hang) with a non-zero exit status;
#   - every rank prints the same error, and it names the failed rank;
#   - the checkpoint has no .metadata.
# Usage: cmake -DMPIEXEC=... -DEXE=dcpp_mpi_checkpoint_test -DDIR=... -DNP=4 -DFAILING=2 -P this
foreach(var MPIEXEC EXE DIR NP FAILING)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "expect_rank_failure.cmake: -D${var}=... is required")
  endif()
endforeach()

file(REMOVE_RECURSE ${DIR})
file(MAKE_DIRECTORY ${DIR})
execute_process(
  COMMAND ${MPIEXEC} --oversubscribe --allow-run-as-root -np ${NP} ${EXE} --dir=${DIR}
          --save-failing-rank=${FAILING}
  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err TIMEOUT 120)
message(STATUS "exit status: ${rc}\n${out}")
if(NOT rc MATCHES "^[0-9]+$")
  message(FATAL_ERROR "the job did not end by itself: ${rc}\n${err}")
endif()
if(rc EQUAL 0)
  message(FATAL_ERROR "the job exited 0 although rank ${FAILING} failed\n${err}")
endif()

# Error messages hold ";", the list separator of CMake: make it plain text first.
string(REPLACE ";" "," out "${out}")
string(REPLACE "\n" ";" lines "${out}")
set(reports "")
set(seen "")
foreach(line IN LISTS lines)
  if(line MATCHES "^rank ([0-9]+): (.*)$")
    list(APPEND seen ${CMAKE_MATCH_1})
    list(APPEND reports "${CMAKE_MATCH_2}")
  endif()
endforeach()
list(LENGTH seen n)
list(REMOVE_DUPLICATES seen)
list(LENGTH seen distinct)
if(NOT n EQUAL NP OR NOT distinct EQUAL NP)
  message(FATAL_ERROR "expected one report from each of ${NP} ranks, got ranks [${seen}]\n${err}")
endif()
list(GET reports 0 first)
foreach(r IN LISTS reports)
  if(NOT r STREQUAL first)
    message(FATAL_ERROR "ranks disagree:\n  ${first}\n  ${r}")
  endif()
endforeach()
if(NOT first MATCHES "failed on rank ${FAILING}[,:]" OR NOT first MATCHES "injected disk failure")
  message(FATAL_ERROR "the error does not name rank ${FAILING} and its cause: ${first}")
endif()
if(EXISTS ${DIR}/failing_rank/.metadata)
  message(FATAL_ERROR "${DIR}/failing_rank/.metadata was committed by a failed save")
endif()
file(REMOVE_RECURSE ${DIR})
