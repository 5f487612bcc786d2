# Fill in DEVICE and NPROC when the caller left them unset. Sourced by 01_zero_shot_search.sh and
# 03_evaluation.sh after they set PYTHON and SPACE.
#   DEVICE: cpu for the demo space, else cuda when torch finds a GPU, else cpu.
#   NPROC:  1 on the CPU, else the number of visible GPUs.
if [ -z "${DEVICE:-}" ]; then
    if [ "$SPACE" = demo ]; then
        DEVICE=cpu
    else
        DEVICE=$("$PYTHON" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
    fi
fi
if [ -z "${NPROC:-}" ]; then
    if [ "$DEVICE" = cpu ]; then
        NPROC=1
    else
        NPROC=$("$PYTHON" -c 'import torch; print(max(1, torch.cuda.device_count()))')
    fi
fi
