# Runs one libFuzzer target for a bounded time over a copy of its seed corpus.
# -DFUZZER=binary -DCORPUS=work dir -DSEEDS=seed dir -DSECONDS=n (default 20)
if(NOT SECONDS)
  set(SECONDS 20)
endif()
file(MAKE_DIRECTORY ${CORPUS})
if(EXISTS ${SEEDS})
  file(GLOB seeds ${SEEDS}/*)
  if(seeds)
    file(COPY ${seeds} DESTINATION ${CORPUS})
  endif()
endif()
execute_process(COMMAND ${FUZZER} -max_total_time=${SECONDS} -max_len=65536 -rss_limit_mb=2048
                        -timeout=10 ${CORPUS}
                RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "${FUZZER} failed with ${rc}")
endif()
