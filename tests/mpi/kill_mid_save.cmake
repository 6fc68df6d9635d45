# kill -9 of a rank mid-save, checked from outside the job (mpi_kill_test.cc has the phases):
# for a killed non-coordinator and a killed coordinator (which holds the save lock) in turn:
#   1. 4 ranks save a good checkpoint;
#   2. 4 ranks save again and one rank SIGKILLs itself mid-file: the job must end by itself
#      (no hang) with a non-zero status;
#   3. a fresh process loads the good checkpoint bit-exact, finds `.metadata` unchanged and the
#      killed save's leftovers present;
#   4. the next 4-rank save succeeds (the dead holder's lock is gone) and removes the leftovers.
# Usage: cmake -DMPIEXEC=... -DEXE=dcpp_mpi_kill_test -DDIR=... -P kill_mid_save.cmake
foreach(var MPIEXEC EXE DIR)
  if(NOT DEFINED ${var})
    message(FATAL_ERROR "kill_mid_save.cmake: -D${var}=... is required")
  endif()
endforeach()

set(mpi ${MPIEXEC} --oversubscribe --allow-run-as-root -np 4)
file(REMOVE_RECURSE ${DIR})
file(MAKE_DIRECTORY ${DIR})
set(ck ${DIR}/ck)

function(run expect_ok)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err
                  TIMEOUT 120)
  message(STATUS "${ARGN}\n  -> ${rc}\n${out}")
  if(NOT rc MATCHES "^[0-9]+$")
    message(FATAL_ERROR "did not end by itself (${rc}): ${ARGN}\n${err}")
  endif()
  if(expect_ok AND NOT rc EQUAL 0)
    message(FATAL_ERROR "failed (${rc}): ${ARGN}\n${out}\n${err}")
  endif()
  if(NOT expect_ok AND rc EQUAL 0)
    message(FATAL_ERROR "exited 0 although a rank was killed: ${ARGN}\n${out}\n${err}")
  endif()
  set(last_out "${out}" PARENT_SCOPE)
endfunction()

run(TRUE ${mpi} ${EXE} save --dir=${ck} --seed=1)
set(good 1)
foreach(killed 2 0)
  math(EXPR doomed "${good} + 1")
  math(EXPR next "${good} + 2")
  run(FALSE ${mpi} ${EXE} kill --dir=${ck} --seed=${doomed} --kill-rank=${killed}
      --after-bytes=300000)
  if(NOT last_out MATCHES "rank-killing itself")
    message(FATAL_ERROR "rank ${killed} did not reach its kill point")
  endif()
  run(TRUE ${EXE} check --dir=${ck} --seed=${good})
  run(TRUE ${mpi} ${EXE} save --dir=${ck} --seed=${next})
  run(TRUE ${EXE} clean --dir=${ck} --seed=${next})
  set(good ${next})
endforeach()
file(REMOVE_RECURSE ${DIR})
