#!/bin/bash
# ISAC2 killed with SIGKILL twice and resumed with the same command; stops after generation 1's first SAC round
# and copies that round's checkpoint, to compare with an uninterrupted run's (bench/scale.md, 100,000 particles).
#
#   bench/isac2_kill_resume.sh STAR OUT STATE_COPY [extra isac2 options]
#
# Run from the repository root; the uninterrupted run's checkpoints/state.npz, copied right after the log line
# "main 1 generation 1 round 1: N classes", is the reference (compare with numpy: every array equal).
set -u
STAR=$1; OUT=$2; COPY=$3; shift 3
LOG=$OUT/log.txt
EVENTS=$OUT.events
start() { setsid env OMP_NUM_THREADS=1 PYTHONPATH=src python -m isavar isac2 "$STAR" "$OUT" --radius 50 --CTF \
          --workers 2 --rand_seed 1 "$@" >> "$OUT.out" 2>&1 & echo $! > "$OUT.pid"; }
kill_run() { kill -9 -- -"$(cat "$OUT.pid")"; sleep 3; echo "killed at $(date -u +%T): $1" >> "$EVENTS"; }
wait_for() { until grep -qE "$1" "$LOG" 2>/dev/null; do sleep 5; done; }
start "$@"
wait_for "building the working stack"
sleep 60; kill_run "building the working stack"
start "$@"
wait_for "main 1 generation 1 round 1: EQK iteration 3 done"
sleep 20; kill_run "round 1, EQK iteration 4"
start "$@"
wait_for "main 1 generation 1 round 1: [0-9]+ classes"
sleep 30                                   # the round's checkpoint is written right after its log line
cp "$OUT/checkpoints/state.npz" "$COPY"
kill_run "after round 1"
