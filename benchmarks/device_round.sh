#!/usr/bin/env bash
# One GPU round of the SD-1.5-size checks, sized for one lease of a lent device (15 minutes in all,
# a machine's start included): the numerics check (#32 §7) and the speed plan with and without
# --compile (#35). Each run has its own time limit, so one that hangs leaves the others their time;
# every JSON lands in $OUT (the device tool brings it back) or outputs/device/.
#
#   bash benchmarks/device_round.sh --wheels   # here, once: the packages the device's image lacks, into .whl/
#   bash benchmarks/device_round.sh            # there (device run, carry [".whl"], timeout_s 540)
#   SMOKE=1 bash benchmarks/device_round.sh    # here: its steps on the tiny models and the CPU (not --compile)
#
# The device's image has PyTorch, transformers, peft, accelerate and OpenCV but not diffusers,
# pydantic or open_clip (read for CLIP's BPE vocabulary); .whl/ is ignored by git (.git/info/exclude).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--wheels" ]; then
    grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
    exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl diffusers==0.42.1 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
        typing-inspection==0.4.5 open_clip_torch==3.3.0
fi

OUT=${OUT:-outputs/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -n "${SMOKE:-}" ]; then
    PYTHON=${PYTHON:-python3}
    size=(--device cpu)
    check=(--small --frames 4 --steps 3)
    plan=full:4,reedit:4
else
    PYTHON=python3
    if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target .whl/site \
            .whl/*.whl || exit 1
        export PYTHONPATH="$PWD/.whl/site"
    fi
    export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
    size=(--full-size --device cuda)
    check=(--device cuda)
    plan=full:40,reedit:40,full:160
fi

step() {  # step NAME SECONDS COMMAND...: run it under its limit, log to $OUT/NAME.log, go on either way
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit} s)"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | tail -n 25
    echo "== $name exit ${PIPESTATUS[0]}"
}

step sd15_check 120 "$PYTHON" benchmarks/sd15_check.py "${check[@]}" --json "$OUT/sd15_check.json"
step edit_speed_eager 180 "$PYTHON" benchmarks/edit_speed.py "${size[@]}" --plan "$plan" \
    --json "$OUT/edit_speed_eager.json"
if [ -z "${SMOKE:-}" ]; then  # inductor's compile on a CPU alone outlasts the smoke run's purpose
    step edit_speed_compiled 220 "$PYTHON" benchmarks/edit_speed.py "${size[@]}" --compile --plan "$plan" \
        --json "$OUT/edit_speed_compiled.json"
fi
ls -l "$OUT"
