#!/usr/bin/env bash
# Kill-and-resume demo of dcpp_train (examples/train.cc), on the local filesystem:
#   (a) a reference run: 4 ranks, 60 steps, a checkpoint every 10;
#   (b) the same run, slowed down, killed with SIGKILL (whole process group) once step 35 is logged;
#   (c) resumed from its newest committed checkpoint with 3 ranks: losses must match the reference
#       to a relative 1e-5 (another world size regroups the sums);
#   (e) the same checkpoint resumed with 4 ranks: the loss lines must be identical to the reference;
#   (d) the resumed steps are printed beside the reference.
# Usage: train_demo.sh BUILD_DIR [OUT_DIR]. TRAIN_FLAGS adds flags to every run of dcpp_train (e.g.
# "--async thread": the checkpoints are then async saves; the checks are the same). Without OUT_DIR a temporary directory is used and
# removed. Exits non-zero if a check fails. MPIEXEC overrides the launcher (default mpirun).
set -euo pipefail

build=${1:?usage: train_demo.sh BUILD_DIR [OUT_DIR]}
train="$build/examples/dcpp_train"
[[ -x $train ]] || { echo "train_demo: $train is missing (build target dcpp_train)" >&2; exit 2; }
mpiexec=${MPIEXEC:-mpirun}
if [[ $EUID -eq 0 ]]; then
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
fi
if [[ $# -ge 2 ]]; then
  out=$2
  rm -rf "$out"
  mkdir -p "$out"
else
  out=$(mktemp -d "${TMPDIR:-/tmp}/dcpp-train-demo.XXXXXX")
fi

steps=60
every=10
kill_after=35
job_pid=""

# Kills the background job, if one is running. mpirun was started by setsid, so the job is its
# session; Open MPI puts each rank in a process group of its own, so killing mpirun's group is not
# enough: every process of the session is killed, then waited for.
kill_job() {
  [[ -n $job_pid ]] || return 0
  local pids alive=""
  pids=$(ps -o pid= -s "$job_pid" 2>/dev/null || true)
  kill -9 -- "-$job_pid" $pids 2>/dev/null || true
  wait "$job_pid" 2>/dev/null || true
  for _ in $(seq 100); do
    alive=$(ps -o pid= -s "$job_pid" 2>/dev/null || true)
    [[ -z $alive ]] && break
    kill -9 $alive 2>/dev/null || true
    sleep 0.05
  done
  if [[ -n $alive ]]; then
    echo "train_demo: processes still alive after SIGKILL:" $alive >&2
    return 1
  fi
  job_pid=""
}
cleanup() {
  kill_job || true
  [[ $# -ge 2 ]] || rm -rf "$out"
}
if [[ $# -ge 2 ]]; then trap 'kill_job || true' EXIT; else trap cleanup EXIT; fi

run() {  # run NP DIR LOG [flags...]
  local np=$1 dir=$2 log=$3
  shift 3
  "$mpiexec" --oversubscribe --allow-run-as-root -np "$np" "$train" --dir "$dir" --log "$log" \
    --steps "$steps" --every "$every" ${TRAIN_FLAGS:-} "$@" >/dev/null 2>>"$out/stderr.log"
}
last_step() { [[ -f $1 ]] && tail -n 1 "$1" | awk '$1 == "step" { print $2 }' || true; }

start=$(date +%s.%N)
echo "== (a) reference: 4 ranks, $steps steps, checkpoint every $every"
run 4 "$out/ref" "$out/ref.log"
echo "   $(wc -l <"$out/ref.log") loss lines; last: $(tail -n 1 "$out/ref.log")"

echo "== (b) the same run, killed with SIGKILL once step $kill_after is logged"
setsid "$mpiexec" --oversubscribe --allow-run-as-root -np 4 "$train" --dir "$out/run" \
  --log "$out/killed.log" --steps "$steps" --every "$every" --sleep-ms 60 ${TRAIN_FLAGS:-} \
  >/dev/null 2>>"$out/stderr.log" &
job_pid=$!
deadline=$((SECONDS + 60))
while :; do
  s=$(last_step "$out/killed.log")
  [[ -n $s && $s -ge $kill_after ]] && break
  if ! kill -0 "$job_pid" 2>/dev/null; then
    echo "train_demo: the job ended before step $kill_after" >&2
    exit 1
  fi
  if ((SECONDS > deadline)); then
    echo "train_demo: step $kill_after not reached in 60 s" >&2
    exit 1
  fi
  sleep 0.05
done
kill_job
echo "   killed at step $(last_step "$out/killed.log"); no rank left running"
committed=()
for d in "$out"/run/step_*; do
  [[ -d $d ]] || continue
  if [[ -f $d/.metadata ]]; then committed+=("$(basename "$d")"); else
    echo "   $(basename "$d"): incomplete (no .metadata), will be ignored"
  fi
done
echo "   committed checkpoints: ${committed[*]:-none}"
[[ ${#committed[@]} -gt 0 ]] || { echo "train_demo: nothing committed before the kill" >&2; exit 1; }
cp -a "$out/run" "$out/run_np3"
cp -a "$out/run" "$out/run_np4"

echo "== (c) resume with 3 ranks"
run 3 "$out/run_np3" "$out/resume3.log"
echo "== (e) resume with 4 ranks"
run 4 "$out/run_np4" "$out/resume4.log"
grep "resumed from" "$out/stderr.log" | sed 's/^/   /'

first=$(head -n 1 "$out/resume3.log" | awk '{ print $2 }')
echo "== (d) steps $first..$steps after the resume"
status=0
if [[ $(wc -l <"$out/resume3.log") -ne $((steps - first + 1)) || $(last_step "$out/resume3.log") -ne $steps ]]; then
  echo "train_demo: the 3-rank resume did not run steps $first..$steps" >&2
  status=1
fi
# Side by side: step, reference, 3 ranks, relative difference, 4 ranks identical to the text?
awk -v tol=1e-5 '
  FILENAME == ARGV[1] { ref[$2] = $4; next }
  FILENAME == ARGV[2] { np4[$2] = $4; next }
  {
    r = ref[$2] + 0; v = $4 + 0
    d = r - v; if (d < 0) d = -d
    m = r < 0 ? -r : r
    rel = m > 0 ? d / m : d
    if (!($2 in ref) || rel > tol) bad++
    if (!($2 in np4) || np4[$2] != ref[$2]) diff4++
    printf "   step %3d  ref %-14s np3 %-14s rel %.1e  np4 %s\n", $2, ref[$2], $4, rel,
           (np4[$2] == ref[$2] ? "identical" : "DIFFERS " np4[$2])
  }
  END {
    printf "   3 ranks vs reference: %s (relative tolerance %g)\n", bad ? bad " steps OFF" : "match", tol
    printf "   4 ranks vs reference: %s\n", diff4 ? diff4 " lines differ" : "bit-identical"
    exit (bad || diff4) ? 1 : 0
  }' "$out/ref.log" "$out/resume4.log" "$out/resume3.log" || status=1
# The 4-rank resume, as text, is exactly the reference's tail.
if ! diff <(tail -n +"$first" "$out/ref.log") "$out/resume4.log" >/dev/null; then
  echo "train_demo: 4-rank resume differs from the reference" >&2
  status=1
fi
printf "== done in %s s: %s\n" "$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')" \
  "$([[ $status -eq 0 ]] && echo "all checks passed" || echo "CHECKS FAILED")"
exit $status
