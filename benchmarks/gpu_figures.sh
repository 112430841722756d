#!/usr/bin/env bash
# The GPU figures of the kernel and the trainer, each step under its own time limit, from a
# checkout on a machine with one NVIDIA GPU and JAX with CUDA (no install of this package needed).
#
#   bash benchmarks/gpu_figures.sh kernel OUT   # SRA kernel: the tests compiled for the GPU,
#                                               # then benchmarks/sra_kernel.py --tune
#   bash benchmarks/gpu_figures.sh train OUT    # 1.3B train step at 480p (MFU), the kernel at
#                                               # its default tiles, and against the dense-mask
#                                               # reference where that fits
#   bash benchmarks/gpu_figures.sh mfu OUT      # the cuDNN composition's tests on the GPU, then
#                                               # the 1.3B step per attention implementation and
#                                               # remat policy, with a per-kernel profile
#
# Logs and JSON land in OUT (default benchmarks/results/gpu). Wheels in .whl/ (grain,
# ml_collections, ...) are installed into /tmp/site first when present.
set -u
what=${1:?usage: gpu_figures.sh kernel|train|mfu [OUT]}
out=${2:-benchmarks/results/gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

if compgen -G ".whl/*.whl" >/dev/null; then
    $py -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
# Without an install, avatarv_jax.kernels is the top-level kernels/ folder (setup.py maps it).
if ! (cd / && $py -c "import avatarv_jax.kernels" 2>/dev/null); then
    [ -e avatarv_jax/kernels ] || ln -s ../kernels avatarv_jax/kernels
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi

step() {   # step NAME SECONDS COMMAND...: run with a limit, log to OUT/NAME.log, keep going
    local name=$1 limit=$2
    shift 2
    echo "== $name (limit ${limit}s)"
    local start=$SECONDS
    timeout "$limit" "$@" >"$out/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$out/$name.log"
    echo "== $name: exit $rc after $((SECONDS - start)) s"
    return $rc
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$py -c "import jax; print('jax', jax.__version__, jax.devices())"

case $what in
kernel)
    # fp32 comparisons need exact products in the XLA reference too (the default is TF32);
    # four test processes share the GPU, so none may take 75% of its memory up front.
    step kernel_tests 200 env JAX_DEFAULT_MATMUL_PRECISION=highest \
        XLA_PYTHON_CLIENT_PREALLOCATE=false \
        $py -m pytest -q -x -n 4 -p no:cacheprovider tests/test_sra_pallas.py \
        -k "not tpu_variant and not lower_for_the_accelerator"
    step sra_kernel 330 $py benchmarks/sra_kernel.py --tune --repeats 5 \
        --out "$out/sra_kernel.json"
    ;;
train)
    step train_step 300 $py benchmarks/train_step.py --model avatar_v_1_3b --gpu-figure \
        --steps 5 --profile --tag cudnn_attention_auto --out "$out"
    step sra_kernel_default_tiles 150 $py benchmarks/sra_kernel.py --repeats 5 \
        --out "$out/sra_kernel.json"
    # The dense-mask reference fits only at a short GEN: 5 frames (7,800 tokens), 1 head.
    step sra_dense 120 $py benchmarks/sra_kernel.py --gen_frames 5 --heads 1 \
        --multiples 1,2,4 --repeats 5 ${SRA_BLOCKS:+--blocks $SRA_BLOCKS} \
        --out "$out/sra_kernel_dense.json"
    ;;
mfu)
    [ -n "${SKIP_TESTS:-}" ] || step cudnn_tests 150 env XLA_PYTHON_CLIENT_PREALLOCATE=false \
        $py -m pytest -q -x -p no:cacheprovider tests/test_sra_cudnn.py
    # VARIANTS: impl:remat[:row_padding] (each ~100 s with the compile), fastest expected first.
    for v in ${VARIANTS:-cudnn:attention pallas:attention cudnn:attention:off}; do
        IFS=: read -r impl remat padding <<<"$v"
        padding=${padding:-auto}
        step "train_step_${impl}_${remat}_${padding}" 200 $py benchmarks/train_step.py \
            --model avatar_v_1_3b --gpu-figure --steps 3 --profile --row-padding "$padding" \
            --attention-impl "$impl" --remat "$remat" --tag "${impl}_${remat}_${padding}" \
            --out "$out"
    done
    ;;
*)
    echo "unknown figure set $what: use kernel, train or mfu" >&2
    exit 2
    ;;
esac
