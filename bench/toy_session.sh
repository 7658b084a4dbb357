#!/usr/bin/env bash
# One session's toy-world training on the lent GPU, run detached so that it outlives the device call that starts it
# (a command's processes are killed when it returns, except those in a new session): later calls poll the log and
# bring back the progress file. bench/NOTES.md ("Toy-world training on the lent GPU") has the calls.
#
#   setsid bash bench/toy_session.sh RUN TRAIN_MINUTES DEADLINE_MINUTES [CARRY] > /tmp/session.log 2>&1 < /dev/null &
#
# RUN: a new run folder; TRAIN_MINUTES: the cosine schedule's planned length; DEADLINE_MINUTES: when the process stops
# training (set-up included), saved; CARRY: the last session's progress file, else the run starts from the shipped
# weights. Ends with RUN/progress.carry (the EMA minus the shipped weights, jinbetween.toyworld.carry) and
# RUN/xla_cache.tgz (the compile cache). VIDEOS and BATCH_SIZES (environment) override the pool size and the
# measured batch sizes, e.g. for a CPU smoke run.
set -euo pipefail
run=$1 train_minutes=$2 deadline_minutes=$3 carry=${4:-}
shipped=jinbetween/toyworld/weights
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.95
init=$shipped
# XLA's compiled programs and per-fusion autotuning results of earlier sessions (archives of a run's xla_cache/,
# committed in bench/results/toyworld/xla_cache/, one per kind of card and jax): a program compiled on the same kind
# of card with the same jax loads instead of compiling, and otherwise the autotuning results spare most of the
# compile. The session's own cache comes back as RUN/xla_cache.tgz.
for archive in bench/results/toyworld/xla_cache/*.tgz; do
  if [ -f "$archive" ]; then mkdir -p "$run" && tar -C "$run" -xzf "$archive"; fi
done
if [ -n "$carry" ]; then
  init=$run.init
  JAX_PLATFORMS=cpu python3 -m jinbetween.toyworld.carry unpack --carry "$carry" --base $shipped --out "$init"
fi
python3 -m jinbetween.toyworld.train unet --run "$run" --init "$init" --videos "${VIDEOS:-16000}" \
  --batch-sizes ${BATCH_SIZES:-256} --base-learning-rate 1e-4 --train-minutes "$train_minutes" \
  --deadline-minutes "$deadline_minutes"
JAX_PLATFORMS=cpu python3 -m jinbetween.toyworld.carry pack --run "$run" --base $shipped --out "$run/progress.carry" \
  --step-fraction 0.5
tar -C "$run" -czf "$run/xla_cache.tgz" xla_cache && du -sh "$run/xla_cache" "$run/xla_cache.tgz" || true
echo "session done"
